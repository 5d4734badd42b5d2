from lora_demo.cli import main

main()
