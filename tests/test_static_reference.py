"""The static-cache reference decoder (`calibrate.static_reference`), the yardstick of the backend: on CPU
it must generate exactly the tokens of a plain full-sequence forward, for a batch, from the same weights."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
torch.set_num_threads(1)

from backend.executor import prompt_tokens  # noqa: E402
from backend.model import build_model  # noqa: E402
from calibrate.static_reference import StaticDecoder  # noqa: E402
from hardware.catalog import get_model  # noqa: E402
from tests.test_backend import reference_generate  # noqa: E402


def test_static_decoder_generates_the_reference_tokens() -> None:
    spec = get_model("tiny-llama")
    model = build_model(spec, torch.device("cpu"), torch.float32, seed=3)
    prompt, steps = 21, 6
    prompts = [prompt_tokens(0, i, prompt, spec.vocab_size) for i in range(3)]
    ref = StaticDecoder(model, 3, prompt + steps)
    tok = ref.forward(torch.tensor(prompts), 0)
    out = [tok]
    for step in range(steps - 1):
        tok = ref.forward(tok[:, None], prompt + step)
        out.append(tok)
    got = torch.stack(out, 1).tolist()
    for i, p in enumerate(prompts):
        assert got[i] == reference_generate(model, p, steps)
    with pytest.raises(ValueError, match="position 0"):
        ref.forward(torch.tensor(prompts)[:, :2], 5)
