"""The evaluation API (issue 23, item 2): `echo` with the prompt's logprobs, score-only requests, prompt lists, `n`,
/tokenize, /detokenize and /tokenizer_info, against the shipped model exported to ONNX (the server of
test_server.py) and checked against the runtime's own log-softmax; then lm-evaluation-harness itself, offline, with
`local-completions` and tasks built here from the held-out corpus."""

from __future__ import annotations

# ruff: noqa: F811 (test_server's fixtures, imported by name, are the tests' arguments)

import httpx
import numpy as np
import pytest

from ernie_paddle.corpus import held_out_text
from ernie_paddle.ort.runtime import OnnxCausalLM
from ernie_paddle.scoring import log_softmax, perplexity
from test_server import NAME, client, onnx_dir, service, tok, url  # noqa: F401 (fixtures)

TOLERANCE = 1e-4  # served log-probabilities vs the runtime's log-softmax of its full-sequence logits (float32)
PROMPT = "ROMEO:\nWhat say you to this? Speak, and tell me"


@pytest.fixture(scope="module")
def reference(onnx_dir):
    """`reference(ids)`: log-softmax [T, V] of OnnxCausalLM.logits over the whole sequence, no cache."""
    model = OnnxCausalLM(onnx_dir, threads=1)
    return lambda ids: log_softmax(model.logits(np.asarray(ids, np.int64)))


def completion(url: str, **body) -> dict:
    r = httpx.post(url + "/v1/completions", json={"model": NAME, "temperature": 0, **body}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def check_prompt_scores(lp: dict, ids: list[int], logp: np.ndarray, k: int) -> None:
    """The echoed prompt part of `logprobs`: null first, then each token's log-softmax value, and top dicts of k
    entries (or k + 1 with the token itself) holding the token with the very same float."""
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    served = np.array(lp["token_logprobs"][1:len(ids)])
    expected = logp[np.arange(len(ids) - 1), ids[1:]]
    assert np.abs(served - expected).max() < TOLERANCE
    for i in range(1, len(ids)):
        top, token = lp["top_logprobs"][i], lp["tokens"][i]
        assert top[token] == lp["token_logprobs"][i]  # the same float: lm-eval's is_greedy compares them
        assert len(top) in (k, k + 1)
        best = np.sort(logp[i - 1])[::-1][:k]
        assert np.abs(np.sort(list(top.values()))[::-1][:k] - best).max() < TOLERANCE


# ---- echo --------------------------------------------------------------------------------------------------------
def test_echo_with_one_new_token(url, tok, reference):
    ids = tok.encode(PROMPT)
    logp = reference(ids)
    out = completion(url, prompt=ids, max_tokens=1, logprobs=2, echo=True)
    (choice,) = out["choices"]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(ids) + 1
    check_prompt_scores(lp, ids, logp, 2)
    greedy = int(logp[-1].argmax())  # the one generated token: the greedy choice after the whole prompt
    assert abs(lp["token_logprobs"][-1] - logp[-1, greedy]) < TOLERANCE
    assert choice["text"] == tok.decode(ids) + tok.decode([greedy], skip_special_tokens=True)
    assert "".join(lp["tokens"]) == choice["text"]
    assert lp["text_offset"] == [len("".join(lp["tokens"][:i])) for i in range(len(ids) + 1)]
    assert out["usage"]["prompt_tokens"] == len(ids) and out["usage"]["completion_tokens"] == 1


def test_score_only(url, tok, reference):
    ids = tok.encode(PROMPT)
    out = completion(url, prompt=ids, max_tokens=0, logprobs=1, echo=True)
    (choice,) = out["choices"]
    assert choice["finish_reason"] == "length" and choice["text"] == tok.decode(ids)
    assert len(choice["logprobs"]["tokens"]) == len(ids)
    check_prompt_scores(choice["logprobs"], ids, reference(ids), 1)
    assert out["usage"]["completion_tokens"] == 0
    one = completion(url, prompt=ids, max_tokens=1, logprobs=1, echo=True)["choices"][0]["logprobs"]
    assert one["token_logprobs"][:len(ids)] == choice["logprobs"]["token_logprobs"]  # the same computation


def test_echo_without_logprobs_and_text_prompt(url, tok):
    out = completion(url, prompt=PROMPT, max_tokens=5, echo=True)
    plain = completion(url, prompt=PROMPT, max_tokens=5)
    assert out["choices"][0]["text"] == PROMPT + plain["choices"][0]["text"]
    assert out["choices"][0]["logprobs"] is None


def test_scored_prompt_ignores_the_prefix_cache(url, tok, reference):
    """A prompt the prefix cache holds is still computed, and scored, at every position."""
    ids = tok.encode(held_out_text()[:400])[:90]
    completion(url, prompt=ids, max_tokens=2)  # fills the prefix cache
    again = completion(url, prompt=ids, max_tokens=1)
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    out = completion(url, prompt=ids, max_tokens=1, logprobs=1, echo=True)
    assert out["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    check_prompt_scores(out["choices"][0]["logprobs"], ids, reference(ids), 1)


# ---- several prompts, n ------------------------------------------------------------------------------------------
def test_prompt_lists_answer_choices_in_order(url, tok):
    prompts = [tok.encode("ROMEO:"), "First Citizen:\nBefore we proceed", tok.encode("To be, or not to be:")]
    alone = [completion(url, prompt=p, max_tokens=6)["choices"][0]["text"] for p in prompts]
    out = completion(url, prompt=prompts, max_tokens=6)
    assert [c["index"] for c in out["choices"]] == [0, 1, 2]
    assert [c["text"] for c in out["choices"]] == alone
    lengths = [len(p) if isinstance(p, list) else len(tok.encode(p)) for p in prompts]
    assert out["usage"]["prompt_tokens"] == sum(lengths) and out["usage"]["completion_tokens"] == 18
    one = completion(url, prompt=[prompts[0]], max_tokens=6)  # [[ids]]: one prompt
    assert [c["text"] for c in one["choices"]] == alone[:1]


def test_n_samples_seeded_per_choice(url):
    body = dict(prompt="ROMEO:", max_tokens=12, temperature=1.0, seed=7)
    out = completion(url, n=3, **body)
    texts = [c["text"] for c in out["choices"]]
    assert [c["index"] for c in out["choices"]] == [0, 1, 2]
    # choice j is the request alone with seed 7 + j
    assert texts == [completion(url, **{**body, "seed": 7 + j})["choices"][0]["text"] for j in range(3)]
    assert len(set(texts)) == 3  # independent samples
    assert out["usage"]["prompt_tokens"] == 2 and out["usage"]["completion_tokens"] == 36
    both = completion(url, n=2, **{**body, "prompt": ["ROMEO:", "JULIET:"]})
    assert [c["index"] for c in both["choices"]] == [0, 1, 2, 3]
    assert [c["text"] for c in both["choices"]][:2] == texts[:2]  # prompt p's sample j is choice p * n + j
    assert both["choices"][2]["text"] == completion(url, **{**body, "prompt": "JULIET:"})["choices"][0]["text"]


def test_chat_n(url):
    body = {"model": NAME, "messages": [{"role": "user", "content": "Speak"}], "max_tokens": 8, "seed": 3, "n": 2}
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60).json()
    assert [c["index"] for c in r["choices"]] == [0, 1]
    one = httpx.post(url + "/v1/chat/completions", json={**body, "n": 1, "seed": 4}, timeout=60).json()
    assert r["choices"][1]["message"]["content"] == one["choices"][0]["message"]["content"]


# ---- tokenizer routes --------------------------------------------------------------------------------------------
def test_tokenize_detokenize_and_info(url, tok):
    r = httpx.post(url + "/tokenize", json={"prompt": PROMPT, "add_special_tokens": False}).json()
    assert r == {"count": len(tok.encode(PROMPT)), "max_model_len": 2048, "tokens": tok.encode(PROMPT),
                 "token_strs": None}
    assert httpx.post(url + "/tokenize", json={"prompt": "<s>"}).json()["tokens"] == [tok.bos_token_id]
    chat = httpx.post(url + "/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["tokens"] == tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert httpx.post(url + "/detokenize", json={"tokens": tok.encode(PROMPT)}).json() == {"prompt": PROMPT}
    info = httpx.get(url + "/tokenizer_info").json()
    assert (info["eos_token"], info["bos_token"], info["model_max_length"]) == ("</s>", "<s>", 2048)
    assert info["chat_template"].startswith("{%- if cls_token")


BAD = [  # (route, body, param, message)
    ("/v1/completions", {"prompt": []}, "prompt",
     "prompt is an empty list: give at least one prompt (text or token ids)"),
    ("/v1/completions", {"prompt": [[1, 2], []]}, "prompt", "prompt is empty: give at least one token to continue"),
    ("/v1/completions", {"prompt": "x", "echo": True, "stream": True}, "echo",
     "echo is not supported with \"stream\": true (the prompt's scores come in one answer)"),
    ("/v1/completions", {"prompt": "x", "echo": 1}, "echo", "echo must be true or false, got 1"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, "max_tokens",
     "max_tokens 0 (score the prompt only) needs \"echo\": true"),
    ("/v1/completions", {"prompt": "x", "max_tokens": -1}, "max_tokens", "max_tokens must be an integer >= 0, got -1"),
    ("/v1/completions", {"prompt": "x", "n": 0}, "n", "n must be an integer in [1, 128], got 0"),
    ("/v1/completions", {"prompt": "x", "n": 3, "max_tokens": 1000}, "n",
     "n 3 x max_tokens 1000 = 3000 exceeds the context of 2048 tokens"),
    ("/v1/completions", {"prompt": "x", "n": 2, "stream": True}, "n",
     "n 2 with \"stream\": true is not supported (several choices are answered whole)"),
    ("/v1/completions", {"prompt": ["x", "y"], "stream": True}, "prompt",
     "2 prompts with \"stream\": true is not supported (several choices are answered whole)"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 2, "max_tokens": 1500}, "n",
     "n 2 x max_tokens 1500 = 3000 exceeds the context of 2048 tokens"),
    ("/tokenize", {"prompt": 5}, "prompt", "prompt must be a string, got 5"),
    ("/tokenize", {"prompt": "x", "frobnicate": 1}, "frobnicate",
     "unknown field 'frobnicate': this route takes add_generation_prompt, add_special_tokens, chat_template_kwargs, "
     "messages, model, prompt, return_token_strs, tools"),
    ("/detokenize", {"tokens": [1, 99999]}, "tokens",
     "tokens: token id 99999 at position 1 is out of range for vocab_size 2048"),
]


@pytest.mark.parametrize("route,body,param,message", BAD, ids=[f"{r}:{p}" for r, _, p, _ in BAD])
def test_bad_requests_name_the_field(url, route, body, param, message):
    r = httpx.post(url + route, json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert (r.json()["error"]["param"], r.json()["error"]["message"]) == (param, message)


# ---- lm-evaluation-harness ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lm_eval(monkeypatch_module):
    """lm_eval, imported with every Hugging Face download switched off."""
    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch_module.setenv(name, "1")
    import lm_eval
    import lm_eval.evaluator

    return lm_eval


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as m:
        yield m


def _task(lm_eval, name: str, docs: list[dict], **config):
    """A task of lm-eval built from `docs` in memory (no dataset download, no task yaml)."""
    import datasets
    from lm_eval.api.task import ConfigurableTask

    return ConfigurableTask(config={"task": name, "custom_dataset": lambda **_: {"test": datasets.Dataset.from_list(
        docs)}, "test_split": "test", **config})


def _evaluate(lm_eval, url: str, task, **model_args) -> list[dict]:
    """Run `task` with local-completions against the server (its tokenizer from /tokenizer_info); the samples."""
    args = {"model": NAME, "base_url": url + "/v1/completions", "tokenizer_backend": "remote",
            "tokenized_requests": True, "num_concurrent": 1, "max_retries": 1, **model_args}
    out = lm_eval.evaluator.simple_evaluate(model="local-completions", model_args=args, tasks=[task],
                                            log_samples=True, bootstrap_iters=0, random_seed=0)
    (samples,) = out["samples"].values()
    return samples


def _choice_docs(count: int = 8) -> list[dict]:
    """Which line comes next: a held-out line, its true successor and three lines from further on."""
    lines = [line for line in held_out_text().splitlines() if len(line) > 20]
    return [{"context": lines[i], "choices": [lines[i + 1], lines[i + 7], lines[i + 13], lines[i + 19]], "gold": 0}
            for i in range(0, 40 * count, 40)]


def test_lm_eval_multiple_choice_equals_the_runtime(lm_eval, url, tok, reference):
    docs = _choice_docs()
    task = _task(lm_eval, "shakespeare_next_line", docs, output_type="multiple_choice", doc_to_text="{{context}}",
                 doc_to_choice="{{choices}}", doc_to_target="{{gold}}", target_delimiter="\n",
                 metric_list=[{"metric": "acc"}])
    samples = sorted(_evaluate(lm_eval, url, task, batch_size=4), key=lambda s: s["doc_id"])
    assert len(samples) == len(docs)
    worst = 0.0
    for doc, sample in zip(docs, samples):
        for choice, resp in zip(doc["choices"], sample["resps"]):
            (served, _greedy), = resp if isinstance(resp[0], (list, tuple)) else [resp]
            # lm-eval's split: the context's tokens, then the rest of the tokens of context + continuation
            context = tok.encode(doc["context"])
            whole = tok.encode(doc["context"] + "\n" + choice)
            logp = reference(whole)
            expected = float(sum(logp[i - 1, whole[i]] for i in range(len(context), len(whole))))
            worst = max(worst, abs(served - expected))
    assert worst < TOLERANCE, worst


def test_lm_eval_rolling_perplexity_matches_quant_quality(lm_eval, url, tok, onnx_dir):
    """Held-out perplexity through loglikelihood_rolling (128-token windows, BOS first, the last partial window
    kept) against quant_quality's figure (scoring.perplexity: non-overlapping 128-token windows, a partial one
    dropped) on the same folder."""
    text = held_out_text()
    task = _task(lm_eval, "shakespeare_heldout", [{"text": text}], output_type="loglikelihood_rolling",
                 doc_to_text="", doc_to_target="{{text}}", metric_list=[{"metric": "word_perplexity"}])
    (sample,) = _evaluate(lm_eval, url, task, batch_size=8, max_length=130)
    ids = np.array(tok.encode(text), np.int64)
    served = float(np.exp(-sample["resps"][0][0] / len(ids)))  # every token is predicted once
    figure = perplexity(OnnxCausalLM(onnx_dir, threads=1).logits, ids)
    print(f"held-out perplexity: served {served:.4f}, quant_quality {figure:.4f} ({served / figure - 1:+.3%})")
    assert abs(served / figure - 1) < 0.005
