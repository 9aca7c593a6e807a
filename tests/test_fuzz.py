"""Seeded corruptions of small exports through every reader of ours: each case ends as one clean UserError, or loads
numbers that are provably unaffected (the logits equal the intact export's). Never another exception."""

import json
import random
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from compress_export.core.errors import UserError
from compress_export.core.scheme import Scheme
from compress_export.io.loading import load_model, read_quantized
from compress_export.pipeline.compress import compress

KINDS = [
    ("gptq", dict(method="gptq", fmt="gptq", scheme=Scheme(4, 32, False, "group"))),
    ("awq", dict(method="awq", fmt="awq", scheme=Scheme(4, 32, False))),
    ("ct", dict(method="rtn", fmt="compressed-tensors", scheme=Scheme(3, 32, True))),
    ("sparse24", dict(method="magnitude", sparsity="2:4", scheme=Scheme(4, 32, False))),
]
CASES_PER_KIND = 60
IDS = torch.arange(3, 40).view(1, -1)


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tiny_model):
    d = tmp_path_factory.mktemp("fuzz")
    out = {}
    for name, kw in KINDS:
        compress(tiny_model, d / name, progress=False, dataset=None, num_samples=2, seq_len=16, **kw)
        model, _ = load_model(d / name)
        with torch.no_grad():
            out[name] = (d / name, model(input_ids=IDS).logits)
    return out


def tensors(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def corrupt(d, rng: random.Random) -> str:
    """Apply one seeded corruption to the export in d; return what was done."""
    st = d / "model.safetensors"
    data = st.read_bytes()
    kind = rng.randrange(8)
    if kind == 0:
        cut = rng.randrange(len(data))
        st.write_bytes(data[:cut])
        return f"truncated at {cut} of {len(data)}"
    if kind == 1:
        n = int.from_bytes(data[:8], "little")
        b = bytearray(data)
        for _ in range(rng.randint(1, 3)):
            b[rng.randrange(8, 8 + n)] = rng.randrange(256)
        st.write_bytes(bytes(b))
        return "header bytes flipped"
    t = tensors(st)
    key = rng.choice(sorted(k for k in t if "layers" in k))
    if kind == 2:
        del t[key]
        what = f"dropped {key}"
    elif kind == 3:
        t[key.rsplit(".", 1)[0] + ".renamed_" + key.rsplit(".", 1)[1]] = t.pop(key)
        what = f"renamed {key}"
    elif kind == 4:
        x = t[key]
        t[key] = x[..., :-1].contiguous() if x.dim() and x.shape[-1] > 1 else torch.cat([x.flatten(), x.flatten()])
        what = f"reshaped {key}"
    elif kind == 5:
        t[key] = t[key].float() if not t[key].is_floating_point() else t[key].to(torch.int16)
        what = f"retyped {key}"
    else:
        cfg = json.loads((d / "config.json").read_text())
        q = cfg["quantization_config"]
        field = rng.choice(sorted(q))
        if kind == 6:
            del q[field]
            what = f"config: removed {field}"
        else:
            q[field] = rng.choice([5, -7, "x", None, [], {"a": 1}, 3, 8, True])
            what = f"config: {field} = {q[field]!r}"
        (d / "config.json").write_text(json.dumps(cfg))
        return what
    save_file(t, str(st), metadata={"format": "pt"})
    return what


@pytest.mark.parametrize("kind", [k for k, _ in KINDS])
def test_every_corruption_is_a_clean_error_or_changes_nothing(kind, exports, tmp_path):
    src, want = exports[kind]
    outcomes = {"error": 0, "unaffected": 0}
    for seed in range(CASES_PER_KIND):
        rng = random.Random(f"{kind}-{seed}")
        d = tmp_path / f"case{seed}"
        shutil.copytree(src, d)
        what = corrupt(d, rng)
        try:
            read_quantized(d)
            model, _ = load_model(d)
            with torch.no_grad():
                got = model(input_ids=IDS).logits
        except UserError as e:
            msg = str(e)
            assert msg and "\n" not in msg.strip() and "Traceback" not in msg, (what, msg)
            outcomes["error"] += 1
        except Exception as e:  # noqa: BLE001  (the point: anything else is a bug)
            pytest.fail(f"seed {seed}, {what}: {type(e).__name__}: {e}")
        else:
            assert torch.equal(got, want), f"seed {seed}, {what}: loaded, with different numbers"
            outcomes["unaffected"] += 1
        shutil.rmtree(d)
    print(kind, outcomes)
    assert outcomes["error"] >= CASES_PER_KIND // 2  # the corruptions do bite
