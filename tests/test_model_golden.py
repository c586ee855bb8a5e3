"""The converted golden checkpoint reproduces the original implementation stage by stage (float32)."""

import pytest
import torch

from af2_hf import AudioFlamingo2ForConditionalGeneration
from af2_testing import converted_tiny_dir, load_converted_model, relative_error

TOL = 1e-4  # project bar: ||err|| / ||ref|| per stage; the original's own float32 error reaches 7e-5
CASES = ["a", "b", "c"]


def batch_features(golden, cases):
    """Right-padded window batch as the original collator builds it: zero clips (-100 dB mel), mask 0."""
    windows = max(golden[f"{x}.mel"].shape[0] for x in cases)
    feats = torch.full((len(cases), windows, 1001, 64), -100.0)
    mask = torch.zeros(len(cases), windows, dtype=torch.long)
    for i, x in enumerate(cases):
        n = golden[f"{x}.mel"].shape[0]
        feats[i, :n] = golden[f"{x}.mel"]
        mask[i, :n] = 1
    return feats, mask


@pytest.mark.parametrize("case", CASES)
def test_audio_stages(model, golden, case):
    mel, mask = golden[f"{case}.mel"], golden[f"{case}.window_mask"]
    with torch.no_grad():
        clap = model.model.audio_tower(mel[:, None]).last_hidden_state.flatten(2).transpose(1, 2)
        audio = model.get_audio_features(mel[None], mask[None]).last_hidden_state
    assert relative_error(clap, golden[f"{case}.clap_out"]) <= TOL
    assert audio.shape == golden[f"{case}.audio_embeds"].shape
    assert relative_error(audio, golden[f"{case}.audio_embeds"]) <= TOL


@pytest.mark.parametrize("case", CASES)
def test_logits(model, golden, case):
    with torch.no_grad():
        out = model(
            input_ids=golden[f"{case}.input_ids"],
            input_features=golden[f"{case}.mel"][None],
            input_features_mask=golden[f"{case}.window_mask"][None],
        )
    assert out.logits.shape == golden[f"{case}.logits"].shape
    assert relative_error(out.logits, golden[f"{case}.logits"]) <= TOL


def test_batch_logits_on_attended_positions(model, golden):
    feats, mask = batch_features(golden, ["a", "b"])
    assert torch.equal(mask.float(), golden["batch.window_mask"])
    attention = golden["batch.attention_mask"]
    with torch.no_grad():
        out = model(
            input_ids=golden["batch.input_ids"], attention_mask=attention, input_features=feats, input_features_mask=mask
        )
    attended = attention.bool()
    assert relative_error(out.logits[attended], golden["batch.logits"][attended]) <= TOL
    assert relative_error(out.audio_hidden_states, golden["batch.audio_embeds"]) <= TOL


def test_training_loss(model, golden):
    with torch.no_grad():
        out = model(
            input_ids=golden["train.input_ids"],
            attention_mask=golden["train.attention_mask"],
            input_features=golden["a.mel"][None],
            input_features_mask=golden["a.window_mask"][None],
            labels=golden["train.labels"],
        )
    assert relative_error(out.logits, golden["train.logits"]) <= TOL
    assert abs(out.loss.item() - golden["train.loss"].item()) <= TOL * abs(golden["train.loss"].item())


def test_loss_honours_num_items_in_batch(model, golden):
    kwargs = dict(
        input_ids=golden["train.input_ids"],
        input_features=golden["a.mel"][None],
        input_features_mask=golden["a.window_mask"][None],
        labels=golden["train.labels"],
    )
    with torch.no_grad():
        mean_loss = model(**kwargs).loss
        n = int((golden["train.labels"][:, 1:] != -100).sum())
        summed = model(**kwargs, num_items_in_batch=torch.tensor(1)).loss
    torch.testing.assert_close(summed, mean_loss * n, rtol=1e-5, atol=1e-5)


def test_eager_equals_sdpa(model, golden):
    eager = load_converted_model("eager")
    assert eager.config.text_config._attn_implementation == "eager"
    assert model.config.text_config._attn_implementation == "sdpa"
    feats, mask = batch_features(golden, ["a", "b"])
    kwargs = dict(input_ids=golden["batch.input_ids"], attention_mask=golden["batch.attention_mask"],
                  input_features=feats, input_features_mask=mask)
    with torch.no_grad():
        assert relative_error(eager(**kwargs).logits, model(**kwargs).logits) <= 1e-5


def test_save_load_round_trip(model, golden, tmp_path):
    model.save_pretrained(tmp_path)
    reloaded = AudioFlamingo2ForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert set(reloaded.state_dict()) == set(model.state_dict())
    for key, value in model.state_dict().items():
        assert torch.equal(value, reloaded.state_dict()[key]), key
    kwargs = dict(input_ids=golden["c.input_ids"], input_features=golden["c.mel"][None],
                  input_features_mask=golden["c.window_mask"][None])
    with torch.no_grad():
        assert torch.equal(model(**kwargs).logits, reloaded(**kwargs).logits)


def test_converted_dir_loads_strictly():
    model, info = AudioFlamingo2ForConditionalGeneration.from_pretrained(converted_tiny_dir(), output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
