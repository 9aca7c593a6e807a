"""lm-evaluation-harness as a client (integrations/lm_harness.py): a local task YAML over local documents (no
hub), run through `compress-export eval --tasks` and `compress-export lm-eval --model hf`, its bits per byte
checked against the same documents scored by hand with our loader (lm-eval's rolling loglikelihood of a short
document: the prefix token, then every token of the document)."""

import json
import math

import pytest
import torch
from test_cli import assert_one_line_error, cli

pytest.importorskip("lm_eval")


def local_task(folder, docs, name="ce_local_text"):
    """A loglikelihood_rolling task over `docs` (a JSON-lines file beside its YAML), as lm-eval's wikitext is."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\nmetric_list:\n'
        "  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n"
        "metadata:\n  version: 1.0\n"
    )
    return folder


def bits_per_byte_by_hand(export, docs) -> float:
    from compress_export import load_model

    model, tok = load_model(export)
    prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    nll, nbytes = 0.0, 0
    for d in docs:
        ids = torch.tensor([[prefix, *tok(d)["input_ids"]]])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
        nll -= float(logp.gather(1, ids[0, 1:, None]).sum())
        nbytes += len(d.encode("utf-8"))
    return nll / nbytes / math.log(2)


@pytest.fixture(scope="module")
def tiny_export(tiny_model, tiny_text, tmp_path_factory):
    out = tmp_path_factory.mktemp("lme") / "tiny-w4"
    rc, so, err = cli("--method", "rtn", "--group-size", "32", tiny_model, "-o", out, "-q")
    assert rc == 0, err
    return out


TINY_DOCS = ["the quick brown fox jumps over the lazy dog .", "to be or not to be , that is the question ."]


def test_eval_tasks_on_our_loader_match_the_documents_scored_by_hand(tiny_export, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    tasks = local_task(tmp_path / "tasks", TINY_DOCS)
    rc, so, err = cli("eval", tiny_export, "--tasks", "ce_local_text", "--include-path", tasks, "--json")
    assert rc == 0, err
    res = json.loads(so[so.index("{") :])["lm_eval"]["ce_local_text"]
    assert res["bits_per_byte,none"] == pytest.approx(bits_per_byte_by_hand(tiny_export, TINY_DOCS), rel=1e-4)


def test_eval_tasks_refusals_are_one_line(tiny_export, tmp_path):
    rc, so, err = cli("eval", tiny_export, "--tasks", "no_such_task_xyz")
    assert_one_line_error(rc, err, "no_such_task_xyz", "--include-path")
    rc, so, err = cli("eval", tiny_export)
    assert_one_line_error(rc, err, "--text", "--tasks")


def test_lm_eval_vllm_on_the_cpu_wheel_says_why_in_one_line(tiny_export):
    from compress_export.integrations.lm_harness import vllm_usable

    why = vllm_usable()
    if why is None:
        pytest.skip("lm-eval's vLLM backend can run here (the `vllm` wheel)")
    rc, so, err = cli("lm-eval", "--model", "vllm", "--model_args", f"pretrained={tiny_export}", "--tasks", "x")
    assert_one_line_error(rc, err, "--model vllm")
    rc, so, err = cli("lm-eval", "--model=vllm", f"--model_args=pretrained={tiny_export}", "--tasks", "x")
    assert_one_line_error(rc, err, "vllm")


@pytest.mark.slow
def test_lm_eval_command_loads_a_gptq_export_with_no_code_of_the_users(smollm2_w4, eval_txt, tmp_path, monkeypatch):
    """`compress-export lm-eval --model hf --model_args pretrained=OUT`: transformers loads the GPTQ export
    (through ours where GPTQModel is missing), lm-eval scores shared-text paragraphs."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    paras = [p.strip()[:600] for p in eval_txt.read_text().split("\n\n") if len(p.strip()) > 300][:3]
    tasks = local_task(tmp_path / "tasks", paras)
    out = tmp_path / "res"
    rc, so, err = cli(
        "lm-eval",
        "--model",
        "hf",
        "--model_args",
        f"pretrained={smollm2_w4},dtype=float32",
        "--tasks",
        "ce_local_text",
        "--include_path",
        tasks,
        "--device",
        "cpu",
        "--output_path",
        out,
    )
    assert rc == 0, err[-3000:]
    assert "ce_local_text" in so and "bits_per_byte" in so
    (res,) = out.rglob("results_*.json")
    bpb = json.loads(res.read_text())["results"]["ce_local_text"]["bits_per_byte,none"]
    assert bpb == pytest.approx(bits_per_byte_by_hand(smollm2_w4, paras), rel=1e-3)
