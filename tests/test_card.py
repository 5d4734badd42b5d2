"""The result card's verdicts (app/card.py), from run statuses of the shape records.status gives: each verdict
follows the run's own bootstrap, and a change within the noise is never read as a win."""

from lora_demo.app import card


def _status(chrf=(40.0, 47.0, True), held=(-0.5, True), forget=(0.2, True), status="completed", step=300):
    (c0, c1, c_real), (h, h_real) = chrf, held
    quality = {"n": 200, "split": "Multi30k test_2016_flickr",
               "base": {"chrf": c0, "bleu": 5.0, "loops": 9}, "lora": {"chrf": c1, "bleu": 9.0, "loops": 4},
               "change": {"chrf": {"change": c1 - c0, "real": c_real}, "bleu": {"change": 4.0, "real": True}},
               "heldout_change": None if held[0] is None else {"change": h, "real": h_real},
               "forget_change": None if forget is None else {"change": forget[0], "real": forget[1]}}
    return {"status": status, "data": "captions", "step": step, "total_steps": 300, "quality": quality,
            "summary": {"base_heldout_loss": 5.0, "final_heldout_loss": 5.0 + (h or -0.5), "heldout_pairs": 64,
                        "base_val_loss": 3.0, "final_val_loss": 3.0 + (forget or (0.2,))[0], "elapsed_s": 55.2,
                        "steps_done": step},
            "params": {"trainable": 24576, "pct_trainable": 0.246, "total": 10.02e6}, "adapter_bytes": 98304,
            "finished_s": 61.0}


def test_a_real_win_reads_as_one_and_names_what_it_forgot():
    s = _status()
    assert card.headline(s) == (card.OK, "LoRA learned the captions, and its German got better. "
                                         "It forgot some of what the base knew.")
    html = card.result_card(s)
    assert "40.0 → 47.0 (+7.0, a real rise)" in html and "5.000 → 4.500 (-10.0%)" in html
    assert "24,576 trainable weights (0.246% of 10.0M)" in html and "61 s from start to result" in html


def test_changes_within_the_noise_are_not_wins():
    kind, line = card.headline(_status(chrf=(40.0, 41.0, False), forget=(0.01, False)))
    assert kind == card.MEH and line == "LoRA learned the captions, but its German did not clearly change."
    kind, line = card.headline(_status(held=(-0.01, False), chrf=(40.0, 41.0, False)))
    assert kind == card.MEH and line.startswith("LoRA did not clearly learn the captions")
    assert card.german(_status(chrf=(40.0, 38.0, True)))[0] == card.NO


def test_an_untested_fall_is_not_called_learned_and_a_stopped_run_says_so():
    s = _status(held=(None, False))
    s["quality"]["heldout_change"] = None
    kind, answer, _ = card.learned(s)
    assert kind == card.MEH and "not tested against the luck" in answer
    kind, line = card.headline(_status(status="stopped", step=120))
    assert line == "Stopped after 120 of 300 steps. So far: LoRA learned the captions."
    failed = card.result_card({**_status(), "status": "failed", "error": "out of memory"})
    assert "The run failed. out of memory" in failed
