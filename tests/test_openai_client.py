"""`compress-export serve` driven by the official `openai` client (completions, chat completions through the
export's chat template, streaming, the API key enforced), and serve's network defaults: 127.0.0.1 unless --host,
one warning line for a non-loopback host without a key."""

import pytest
from conftest import have_vllm

from compress_export.integrations import vllm_launch

KEY = "test-key-4f1c"


@pytest.fixture
def launched(monkeypatch, tiny_model):
    """vllm_launch.main's final argv, without starting vLLM."""
    seen = {}
    monkeypatch.setattr(vllm_launch, "run_cli", lambda argv: seen.setdefault("argv", argv))
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    return lambda *args: (vllm_launch.main(["serve", str(tiny_model), *args]), seen.pop("argv"))[1]


def test_serve_binds_loopback_unless_told(launched, capsys):
    argv = launched()
    assert vllm_launch.arg_value(argv, "--host") == "127.0.0.1"
    argv = launched("--host", "0.0.0.0", "--api-key", KEY)
    assert vllm_launch.arg_value(argv, "--host") == "0.0.0.0" and argv.count("--host") == 1
    assert capsys.readouterr().err == ""  # a key given: no warning


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "example.org"])
def test_a_non_loopback_host_without_a_key_warns_once(launched, capsys, host):
    launched("--host", host)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "warning" in err[0] and "--api-key" in err[0], err


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.0.0.5"])
def test_loopback_hosts_do_not_warn(launched, capsys, host):
    launched("--host", host)
    assert capsys.readouterr().err == ""


def test_the_environment_key_counts_as_a_key(launched, capsys, monkeypatch):
    monkeypatch.setenv("VLLM_API_KEY", KEY)
    launched("--host", "0.0.0.0")
    assert capsys.readouterr().err == ""


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.skipif(not have_vllm(), reason="vLLM is not installed")
def test_openai_client_against_serve(smollm2_w4, tmp_path):
    """The official client, as users write it, against our served SmolLM2 GPTQ W4 export."""
    import openai

    from compress_export.integrations.vllm_serve import Server

    with Server(smollm2_w4, tmp_path / "serve.log", name="smol", extra=["--api-key", KEY]) as s:
        client = openai.OpenAI(base_url=s.base_url, api_key=KEY, max_retries=0, timeout=300)
        assert [m.id for m in client.models.list().data] == ["smol"]
        r = client.completions.create(model="smol", prompt="The capital of France is", max_tokens=8, temperature=0)
        assert "Paris" in r.choices[0].text, r
        assert r.usage.completion_tokens <= 8 and r.usage.prompt_tokens > 0
        chat = client.chat.completions.create(
            model="smol",
            messages=[{"role": "user", "content": "What is the capital of France? Answer in one word."}],
            max_tokens=16,
            temperature=0,
        )
        assert "Paris" in chat.choices[0].message.content, chat
        # the chat template ran: the prompt holds its role markers, so it is longer than the bare question's tokens
        assert chat.usage.prompt_tokens > len("What is the capital of France? Answer in one word.".split())
        pieces = list(
            client.completions.create(
                model="smol", prompt="The capital of France is", max_tokens=8, temperature=0, stream=True
            )
        )
        streamed = "".join(p.choices[0].text for p in pieces if p.choices)
        assert len(pieces) > 2 and streamed == r.choices[0].text  # greedy: the same text, token by token
        with pytest.raises(openai.AuthenticationError):  # 401
            openai.OpenAI(base_url=s.base_url, api_key="wrong", max_retries=0).completions.create(
                model="smol", prompt="Hi", max_tokens=1
            )
