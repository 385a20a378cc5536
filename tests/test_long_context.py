"""Long context (131,072 positions) on a tiny MoE model: Paddle, ONNX Runtime (`ort` flavour, fp32) and
transformers (eager, fp32) agree at the end of the window.

* window end: a cache already holding OFFSET = 131072 - 64 slots (the same random keys/values written into all three
  caches), a 56-token prompt, then 8 greedy decode steps that fill the cache to position 131071 exactly (causal
  mask over 131072 slots, positions given explicitly and derived from the mask by the `ort` graph);
* explicit positions without a past: a prompt at positions OFFSET..131071 (Paddle vs transformers: the `ort` graph
  derives positions from attention_mask and refuses explicit ones that differ);
* RoPE itself at positions near 131071: the exported RotaryEmbedding cos/sin caches, ONNX Runtime's op, Paddle and
  transformers compute the same exact angles pos_fp32 * inv_freq_fp32, and cos/sin within the libraries' stated
  ulps; a float64 angle table would be caught;
* a 4096-token prompt prefilled in chunks of 1024 through each runtime's cache, then greedy decode. 32K tokens take
  too long for the suite: `python -m ernie_paddle.tools.long_context` (chunks of 2048, 2 cores: prefill Paddle 280 s,
  ONNX Runtime 40 s, transformers 179 s; max |logit diff| 3.5e-5 and 2.0e-5 on the last chunk, 8 of 8 greedy tokens);
* positions and lengths outside the window are refused with the project's errors.

Bound: max |logit diff| <= 1e-4 against Paddle for both candidates, identical greedy tokens, identical expert sets.
"""

from __future__ import annotations

import os
import re

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from ernie_paddle.checkpoint.folder import convert
from ernie_paddle.errors import InputError
from ernie_paddle.export import pipeline
from ernie_paddle.paddle.modeling import Ernie4_5_MoeForCausalLM
from ernie_paddle.ort.runtime import OnnxCache, OnnxCausalLM

from conftest import import_hf_oracle, prompt

hf_oracle = import_hf_oracle()
import torch  # noqa: E402  (after the skip above)

MAX_POS = 131072
OFFSET = MAX_POS - 64  # cached slots before the prompt
PROMPT, DECODE = 56, 8  # OFFSET + 56 + 8 = 131072: the last decoded token sits at position 131071
LONG, CHUNK, LONG_DECODE = 4096, 1024, 8
TOL = 1e-4


@pytest.fixture(scope="module")
def trio(ckpt_factory, tmp_path_factory):
    """(config, Paddle model, ONNX Runtime model, transformers oracle, ort folder) for a 131072-position tiny MoE."""
    d, cfg = ckpt_factory("long-context-131k", seed=13, max_position_embeddings=MAX_POS)
    assert cfg.head_dim == 16 and cfg.max_position_embeddings == MAX_POS
    folder = str(tmp_path_factory.mktemp("onnx") / "ort-fp32")
    manifest = pipeline.export(d, folder, flavor="ort", precision="fp32")
    assert manifest["verification"]["passed"]
    pt_dir = str(tmp_path_factory.mktemp("hf") / "pt")
    convert(d, pt_dir, layout="pt", dtype="float32")
    return cfg, Ernie4_5_MoeForCausalLM.from_pretrained(d), OnnxCausalLM(folder), hf_oracle.HFOracle(pt_dir), folder


# ---- the three runtimes behind one step function ---------------------------------------------------------------
class Runs:
    """Each runtime's cache, holding the same `past` keys/values (per layer [1, nkv, P, d]) or empty, and one step
    `(ids, mask, pos)` through all three."""

    def __init__(self, cfg, pd, ox, hf, max_len: int, past: tuple[list, list] | None = None):
        import onnxruntime as ort
        import paddle
        from transformers import DynamicCache

        self.pd, self.ox, self.hf = pd, ox, hf
        self.pd_cache = pd.allocate_cache(1, max_len)
        if past is None:
            self.ox_cache = ox.allocate_cache(1, max_len)
            self.hf_cache = DynamicCache(config=hf.model.config)
            return
        past_k, past_v = past
        p = past_k[0].shape[2]
        for i in range(cfg.num_hidden_layers):  # Paddle's cache is [B, S, nkv, d]
            self.pd_cache.keys[i][:, :p] = paddle.to_tensor(past_k[i].transpose(0, 2, 1, 3))
            self.pd_cache.values[i][:, :p] = paddle.to_tensor(past_v[i].transpose(0, 2, 1, 3))
        self.pd_cache.length = p
        self.ox_cache = OnnxCache([(ort.OrtValue.ortvalue_from_numpy(k), ort.OrtValue.ortvalue_from_numpy(v))
                                   for k, v in zip(past_k, past_v)], max_len, p)
        self.hf_cache = DynamicCache([(torch.from_numpy(k), torch.from_numpy(v)) for k, v in zip(past_k, past_v)],
                                     config=hf.model.config)

    def step(self, ids, mask, pos) -> dict:
        """Logits [B, T, V] of each runtime and, for Paddle and HF, the expert choices per MoE layer."""
        out = self.pd(ids, attention_mask=mask, position_ids=pos, cache=self.pd_cache, output_router=True)
        res = {"paddle": out.logits.numpy(), "paddle_router": [e.numpy() for e in out.router_experts]}
        res["ort"] = self.ox(ids, attention_mask=mask, position_ids=pos, cache=self.ox_cache).logits
        self.hf._router.clear()
        with torch.no_grad():
            o = self.hf.model(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                              position_ids=torch.from_numpy(pos), **{HF_CACHE_ARG: self.hf_cache}, use_cache=True)
        res["hf"] = o.logits.numpy()
        res["hf_router"] = [r.numpy() for r in self.hf._router]
        return res


def _hf_cache_arg() -> str:
    """Recent transformers (5.24 here) name the cache argument `cache`, deprecating `past_key_values`."""
    import inspect

    from transformers import Ernie4_5_MoeForCausalLM as HFModel

    return "cache" if "cache" in inspect.signature(HFModel.forward).parameters else "past_key_values"


HF_CACHE_ARG = _hf_cache_arg()


def top5(logits: np.ndarray) -> list[int]:
    return np.argsort(-logits, kind="stable")[:5].tolist()


def same_experts(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) > 0 and all(x.shape == y.shape and all(set(r) == set(s) for r, s in zip(x, y))
                                        for x, y in zip(a, b))


def ort_router_choices(folder, cfg, feeds) -> list[np.ndarray]:
    """The ort graph's expert choices per MoE layer for one run (parity's probe graph with router outputs)."""
    from ernie_paddle.parity.probes import OnnxProbe

    probe = OnnxProbe(folder, cfg)
    outs = probe.runtime.run(probe.router_names, feeds)
    return [np.argsort(-r, axis=-1, kind="stable")[:, :cfg.moe_k] for r in outs]


# ---- 1. the end of the window, through the cache ---------------------------------------------------------------
def test_window_end_prompt_and_decode_agree(trio):
    cfg, pd, ox, hf, folder = trio
    nkv, d, n_layers = cfg.num_key_value_heads, cfg.head_dim, cfg.num_hidden_layers
    rng = np.random.default_rng(3)
    past_k = [rng.standard_normal((1, nkv, OFFSET, d), dtype=np.float32) for _ in range(n_layers)]
    past_v = [rng.standard_normal((1, nkv, OFFSET, d), dtype=np.float32) for _ in range(n_layers)]
    runs = Runs(cfg, pd, ox, hf, MAX_POS, (past_k, past_v))
    mask = np.ones((1, MAX_POS), np.int64)
    positions = np.arange(MAX_POS)[None]  # explicit to Paddle and HF; the ort graph derives the same from the mask
    ids = np.array([prompt(PROMPT, cfg.vocab_size, seed=21)])

    s = OFFSET + PROMPT
    r = runs.step(ids, mask[:, :s], positions[:, OFFSET:s])
    assert r["paddle"].shape == r["ort"].shape == r["hf"].shape == (1, PROMPT, cfg.vocab_size)
    # measured: Paddle vs ORT 7.6e-06, Paddle vs HF 8.6e-06 (logits up to ~10)
    prefill_ort, prefill_hf = (float(np.abs(r["paddle"] - r[k]).max()) for k in ("ort", "hf"))
    assert prefill_ort <= TOL and prefill_hf <= TOL, (prefill_ort, prefill_hf)
    assert same_experts(r["paddle_router"], r["hf_router"])
    feeds = {"input_ids": ids, "attention_mask": mask[:, :s]}
    for i in range(n_layers):
        feeds[f"past_key_values.{i}.key"], feeds[f"past_key_values.{i}.value"] = past_k[i], past_v[i]
    assert same_experts(r["paddle_router"], ort_router_choices(folder, cfg, feeds))

    tokens = {k: [] for k in ("paddle", "ort", "hf")}
    worst = {"ort": 0.0, "hf": 0.0}
    for _ in range(DECODE):
        for k in tokens:
            tokens[k].append(int(r[k][0, -1].argmax()))
        assert tokens["ort"] == tokens["hf"] == tokens["paddle"]
        assert top5(r["ort"][0, -1]) == top5(r["hf"][0, -1]) == top5(r["paddle"][0, -1])  # not only the first
        nxt = np.array([[tokens["paddle"][-1]]])
        r = runs.step(nxt, mask[:, :s + 1], positions[:, s:s + 1])
        s += 1
        for k in worst:
            worst[k] = max(worst[k], float(np.abs(r["paddle"] - r[k]).max()))
        assert same_experts(r["paddle_router"], r["hf_router"])
    # measured over the 8 decode steps (the last at position 131071): Paddle vs ORT 7.2e-06, Paddle vs HF 7.7e-06
    assert worst["ort"] <= TOL and worst["hf"] <= TOL, worst
    assert s == MAX_POS and positions[0, s - 1] == MAX_POS - 1  # the window is full, the last position 131071
    assert runs.pd_cache.length == runs.ox_cache.length == runs.hf_cache.get_seq_length() == MAX_POS
    assert len(set(tokens["paddle"])) > 1  # a real continuation, not one repeated token

    # one more token does not fit: the cache (Paddle) and the window (ONNX Runtime) refuse it
    with pytest.raises(InputError, match=re.escape(f"KV cache holds {MAX_POS} tokens; {MAX_POS + 1} requested")):
        pd(nxt, cache=runs.pd_cache)
    with pytest.raises(InputError, match=re.escape(f"sequence length {MAX_POS + 1} exceeds max_position_embeddings "
                                                   f"{MAX_POS}")):
        ox(nxt, cache=runs.ox_cache)


# ---- 2. explicit positions at the window end, RoPE precision ----------------------------------------------------
def test_prompt_at_explicit_offset_matches_transformers(trio, monkeypatch):
    cfg, pd, ox, hf, _ = trio
    ids = np.array([prompt(64, cfg.vocab_size, seed=31)])
    pos = np.arange(OFFSET, MAX_POS)[None]  # positions 131008 .. 131071, no past
    out = pd(ids, position_ids=pos, output_router=True)
    ours = out.logits.numpy()
    hf._router.clear()
    with torch.no_grad():
        ref = hf.model(torch.from_numpy(ids), position_ids=torch.from_numpy(pos)).logits.numpy()
    diff = float(np.abs(ours - ref).max())
    assert diff <= TOL, diff  # measured: 1.2e-05
    assert same_experts([e.numpy() for e in out.router_experts], [r.numpy() for r in hf._router])
    # RoPE is relative: at positions 0..63 the logits would be the same in exact arithmetic; in fp32 the rounding of
    # the large angles moves them by 1.4e-2 (measured), so agreement to 1.2e-5 means the same fp32 angles in both
    assert np.abs(pd(ids).logits.numpy() - ours).max() > 10 * TOL

    # A float64 angle table (a mistake other ports made) is caught by this bound at these positions.
    import paddle

    from ernie_paddle.paddle import modeling

    def rope_float64(position_ids, head_dim, theta):
        exact = position_ids.numpy().astype(np.float64)[..., None] * theta ** (-np.arange(0, head_dim, 2) / head_dim)
        return (paddle.to_tensor(np.cos(exact).astype(np.float32)).unsqueeze(2),
                paddle.to_tensor(np.sin(exact).astype(np.float32)).unsqueeze(2))

    monkeypatch.setattr(modeling, "rope_cos_sin", rope_float64)
    wrong = float(np.abs(pd(ids, position_ids=pos).logits.numpy() - ref).max())
    assert wrong > 10 * TOL, wrong  # measured: 1.4e-2


def _ulps(values: np.ndarray, exact: np.ndarray) -> float:
    """Largest distance of fp32 `values` from float64 `exact`, in units of the fp32 spacing at `exact`."""
    return float((np.abs(values.astype(np.float64) - exact) / np.spacing(np.abs(exact).astype(np.float32))).max())


def test_rope_at_large_positions_is_fp32_in_all_three(trio):
    """The angles pos_fp32 * inv_freq_fp32 are exact and shared; cos/sin are within stated ulps of float64.

    Why figures varied between installs: transformers' fp32 `pow` put its inv_freq an ulp away from ours at one
    index on one install and not on another (and an fp32 cos is only specified to a few ulps, by CPU path). So the
    table is fixed (correctly rounded, exact here), the angles are checked exactly, and every derived value gets a
    bound from the libraries' stated accuracy: float32 sin/cos within 4 ulps (numpy's SIMD contract; SLEEF u10/u35
    and MKL VML, which torch and Paddle use, promise 1 to 3.5).
    """
    import onnxruntime as ort
    import paddle
    from transformers.models.ernie4_5_moe import modeling_ernie4_5_moe as hf_ernie

    from ernie_paddle import rope
    from ernie_paddle.paddle.modeling import apply_rope, rope_cos_sin

    cfg, _, _, hf, folder = trio
    d, nh, theta = cfg.head_dim, cfg.num_attention_heads, cfg.rope_theta
    # the table: the fp32 values nearest theta^(-2i/d), exactly; transformers' own within one ulp (measured: 1)
    nearest = np.array([theta ** (-i / d) for i in range(0, d, 2)], np.float64).astype(np.float32)
    assert np.array_equal(rope.inv_freq(d, theta), nearest)
    assert _ulps(hf.own_inv_freq.numpy(), nearest.astype(np.float64)) <= 1.0
    rng = np.random.default_rng(5)
    pos = np.concatenate([np.arange(MAX_POS - 256, MAX_POS), rng.integers(0, MAX_POS, 256)])[None]  # [1, 512]
    angles = rope.angle_table(MAX_POS, d, theta)[pos[0]]
    # the angles: exact fp32 products, and transformers forms the same ones from the same table
    assert np.array_equal(angles, pos[0].astype(np.float32)[:, None] * nearest[None, :])
    hf_rotary = hf.model.model.rotary_emb
    assert np.array_equal(angles, (torch.from_numpy(pos[0]).float()[:, None] * hf_rotary.inv_freq).numpy())
    exact_cos, exact_sin = np.cos(angles.astype(np.float64)), np.sin(angles.astype(np.float64))

    model = onnx.load(os.path.join(folder, "model.onnx"))  # with its external data: the caches as exported
    caches = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if t.name.startswith("rope.")}
    cos_cache, sin_cache = caches["rope.cos_cache"], caches["rope.sin_cache"]
    assert cos_cache.shape == sin_cache.shape == (MAX_POS, d // 2) and cos_cache.dtype == np.float32
    # the exported caches are rounded once from float64: within half an ulp (plus float64's own error)
    assert _ulps(cos_cache[pos[0]], exact_cos) <= 0.5 + 1e-6 and _ulps(sin_cache[pos[0]], exact_sin) <= 0.5 + 1e-6
    # transformers' and Paddle's fp32 cos/sin of those angles: within 4 ulps (measured here: 0.6)
    hf_cos, hf_sin = hf_rotary(torch.zeros(1), torch.from_numpy(pos))  # [1, 512, d] (duplicated halves)
    assert _ulps(hf_cos[0, :, :d // 2].numpy(), exact_cos) <= 4 and _ulps(hf_sin[0, :, :d // 2].numpy(), exact_sin) <= 4
    cos, sin = rope_cos_sin(paddle.to_tensor(pos), d, theta)
    assert _ulps(cos.numpy()[0, :, 0], exact_cos) <= 4 and _ulps(sin.numpy()[0, :, 0], exact_sin) <= 4
    # a float64 angle table would be caught: the fp32 angles' cos differs from the exact angles' by far more
    exact = pos[0, :, None].astype(np.float64) * theta ** (-np.arange(0, d, 2) / d)
    assert np.abs(np.cos(exact) - exact_cos).max() > 1e-3  # measured: 2.7e-3

    x = rng.standard_normal((1, pos.shape[1], nh, d), dtype=np.float32)  # [B, T, h, d]
    node = helper.make_node("RotaryEmbedding", ["x", "pos", "cos", "sin"], ["y"], domain="com.microsoft",
                            interleaved=1, num_heads=nh)
    graph = helper.make_graph([node], "rope", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, None, nh * d]),
                                               helper.make_tensor_value_info("pos", TensorProto.INT64, [1, None])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, None, nh * d])],
                              [numpy_helper.from_array(cos_cache, "cos"), numpy_helper.from_array(sin_cache, "sin")])
    op = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    sess = ort.InferenceSession(op.SerializeToString(), providers=["CPUExecutionProvider"])
    y_ort = sess.run(None, {"x": x.reshape(1, -1, nh * d), "pos": pos})[0].reshape(x.shape)
    y_pd = apply_rope(paddle.to_tensor(x), cos, sin).numpy()
    qt = torch.from_numpy(x).transpose(1, 2)  # [B, h, T, d]
    y_hf = hf_ernie.apply_rotary_pos_emb(qt, qt, hf_cos, hf_sin)[0].transpose(1, 2).numpy()
    # y = x_even * cos - x_odd * sin (and the pair): two implementations' cos/sin differ by at most 4 + 4 ulps of
    # values below 1 (8 * 2^-24 each), plus an ulp of rounding in each of the two products and the sum
    pairs = np.abs(x[..., 0::2]) + np.abs(x[..., 1::2])
    bound = float(pairs.max()) * 8 * 2.0 ** -24 + 3 * float(np.spacing(np.float32(np.abs(y_pd).max())))
    assert np.abs(y_ort - y_pd).max() <= bound and np.abs(y_hf - y_pd).max() <= bound  # measured: 4.8e-7 of 2.4e-6
    assert np.abs(y_pd - x).max() > 1.0  # the rotation is not trivial


# ---- 3. a long prompt through chunked prefill -------------------------------------------------------------------
def test_chunked_long_prompt_matches(trio):
    cfg, pd, ox, hf, _ = trio
    runs = Runs(cfg, pd, ox, hf, LONG + LONG_DECODE)
    ids = np.array([prompt(LONG, cfg.vocab_size, seed=41)])
    mask = np.ones((1, LONG + LONG_DECODE), np.int64)
    pos = np.arange(LONG + LONG_DECODE)[None]
    for s in range(0, LONG, CHUNK):  # scores of one chunk: [heads x CHUNK x cached], never [LONG x LONG]
        r = runs.step(ids[:, s:s + CHUNK], mask[:, :s + CHUNK], pos[:, s:s + CHUNK])
    # measured (last chunk, 1024 x 512 logits): Paddle vs ORT 1.5e-05, Paddle vs HF 1.2e-05; decode steps <= 1.1e-05
    last_ort, last_hf = (float(np.abs(r["paddle"] - r[k]).max()) for k in ("ort", "hf"))
    assert last_ort <= TOL and last_hf <= TOL, (last_ort, last_hf)
    assert same_experts(r["paddle_router"], r["hf_router"])
    tokens = []
    for t in range(LONG, LONG + LONG_DECODE):
        nxt = [int(r[k][0, -1].argmax()) for k in ("paddle", "ort", "hf")]
        assert len(set(nxt)) == 1, nxt
        assert top5(r["ort"][0, -1]) == top5(r["hf"][0, -1]) == top5(r["paddle"][0, -1])
        tokens.append(nxt[0])
        r = runs.step(np.array([[nxt[0]]]), mask[:, :t + 1], pos[:, t:t + 1])
        assert max(float(np.abs(r["paddle"] - r[k]).max()) for k in ("ort", "hf")) <= TOL
    assert len(tokens) == LONG_DECODE and runs.pd_cache.length == LONG + LONG_DECODE


# ---- 4. outside the window --------------------------------------------------------------------------------------
def test_positions_outside_the_window_are_refused(trio):
    cfg, pd, ox, _, folder = trio
    msg = f"position id {MAX_POS} is out of range for max_position_embeddings {MAX_POS} (valid: 0 to {MAX_POS - 1})"
    for model in (pd, ox):  # one token, explicit positions: the sequence is short, the position is not
        with pytest.raises(InputError, match=re.escape(msg)):
            model(np.array([[5]]), position_ids=np.array([[MAX_POS]]))
        with pytest.raises(InputError, match=re.escape(msg.replace(f"id {MAX_POS} ", "id -1 "))):
            model(np.array([[5, 6]]), position_ids=np.array([[0, -1]]))
    too_long = np.zeros((1, MAX_POS + 1), np.int64)  # refused before any compute
    for model in (pd, ox):
        with pytest.raises(InputError, match=re.escape(f"sequence length {MAX_POS + 1} exceeds "
                                                       f"max_position_embeddings {MAX_POS}")):
            model(too_long)
    # the ort graph has no position_ids input: explicit positions other than the mask's are refused, not ignored
    with pytest.raises(InputError, match=re.escape(f"{folder}: this ort export has no position_ids input: it "
                                                   f"derives positions from attention_mask (cumsum - 1), and the "
                                                   f"position_ids given differ (row 0, token 0: {OFFSET}, from the "
                                                   f"mask 0); export with --flavor portable")):
        ox(np.array([[5, 6]]), position_ids=np.array([[OFFSET, OFFSET + 1]]))
    # positions equal to the mask's are accepted
    a = ox(np.array([[5, 6]]), position_ids=np.array([[0, 1]])).logits
    assert np.array_equal(a, ox(np.array([[5, 6]])).logits)


def test_long_context_program_smoke(tmp_path):
    """`python -m ernie_paddle.tools.long_context` (the 32K run of the README) on a short prompt: its table and JSON,
    with the same bound as the tests above."""
    import json
    import subprocess
    import sys

    out = tmp_path / "lc.json"
    r = subprocess.run([sys.executable, "-m", "ernie_paddle.tools.long_context", "--tokens", "96", "--chunk", "32",
                        "--decode", "4", "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    rows = {row["runtime"]: row for row in json.load(open(out))["results"]}
    assert set(rows) == {"paddle", "ort", "hf"}
    for name in ("ort", "hf"):
        assert rows[name]["last_chunk_max_abs_diff"] <= TOL and rows[name]["decode_max_abs_diff"] <= TOL
        assert rows[name]["greedy_identical"] == 4
    assert "greedy same" in r.stdout
