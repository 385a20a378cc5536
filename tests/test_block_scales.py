"""Block scales for MatMulNBits / QMoE codes: the absmax rule and the `mse` rule (`export/quantize.py`), in the
quantiser, in GPTQ, in an exported graph and on the command line."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from ernie_paddle.export import quantize
from ernie_paddle.export.quantize import RoundToNearest, dequantize_rows, quantize_rows


def _error(w: np.ndarray, bits: int, block: int, rule: str) -> np.ndarray:
    """Squared rounding error per block [N, K/block] of `w` quantised with `rule`."""
    q, s = quantize_rows(w, bits, block, rule)
    d = dequantize_rows(q, s, bits, w.shape[1]) - w
    return np.square(d).reshape(w.shape[0], -1, block).sum(axis=-1)


@pytest.mark.parametrize("bits, block", [(4, 32), (4, 128), (2, 64), (8, 32)])
def test_mse_scales_round_no_block_worse_than_absmax(bits, block):
    rng = np.random.default_rng(bits * block)
    w = rng.standard_normal((64, 512)).astype(np.float32) * rng.uniform(0.1, 2.0, (64, 1)).astype(np.float32)
    absmax, mse = _error(w, bits, block, "absmax"), _error(w, bits, block, "mse")
    # absmax's scale is one of the candidates, so no block may lose (float32 arithmetic both ways: a hair of slack)
    assert np.all(mse <= absmax * (1 + 1e-6) + 1e-12)
    q, s = quantize_rows(w, bits, block, "mse")
    assert q.dtype == np.uint8 and q.max() < 2 ** bits and s.shape == (64, 512 // block)
    if bits == 4:  # Gaussian rows at 4 bits: measured 11% (block 32) and 19% (block 128) less squared error
        assert mse.sum() < 0.95 * absmax.sum()


def test_rows_are_quantised_in_chunks_with_the_same_result(monkeypatch):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((37, 96)).astype(np.float32)
    whole = quantize_rows(w, 4, 32, "mse")
    monkeypatch.setattr(quantize, "ROWS_AT_ONCE", 8)  # 5 chunks, the last ragged
    chunked = quantize_rows(w, 4, 32, "mse")
    for a, b in zip(whole, chunked):
        np.testing.assert_array_equal(a, b)


def test_absmax_codes_are_llama_cpp_q4_0s_rule():
    """The value of largest magnitude maps exactly to code 0 with scale m / -8, whatever its sign."""
    w = np.array([[0.5, -2.0, 1.0, 0.25], [3.0, -1.0, 0.0, 1.5]], np.float32)
    q, s = quantize_rows(w, 4, 4)
    np.testing.assert_array_equal(s[:, 0], [0.25, -0.375])
    np.testing.assert_array_equal(q[:, 0], [[10, 0, 12, 9], [0, 11, 8, 4]])


def test_an_unknown_rule_is_refused():
    with pytest.raises(ValueError, match="scale rule must be one of absmax, mse, got 'minmax'"):
        RoundToNearest("minmax")


def test_gptq_with_mse_scales_uses_them_on_the_updated_weights():
    from ernie_paddle.export.gptq import gptq_rows

    rng = np.random.default_rng(5)
    w = rng.standard_normal((48, 256)).astype(np.float32)
    x = rng.standard_normal((512, 256)) @ rng.standard_normal((256, 256)) * 0.1
    h = 2 * x.T @ x / len(x)
    codes, scales = gptq_rows(w, h, 4, 128, rule="mse")
    # the first block sees the weights before any error is spread into them: its scales are round-to-nearest's
    np.testing.assert_array_equal(scales[:, 0], quantize_rows(w[:, :128], 4, 128, "mse")[1][:, 0])
    # and the layer's output error on the calibration inputs is below GPTQ's with absmax scales
    def output_error(c, s):
        return float(np.square(x @ (dequantize_rows(c, s, 4, 256) - w).T).sum())

    assert output_error(codes, scales) < output_error(*gptq_rows(w, h, 4, 128))


def test_export_with_mse_scales_is_exact_against_its_round_trip(ckpt_factory, tmp_path):
    """The graph computes with exactly the weights `round_trip(..., rule='mse')` gives, and says so in its
    manifest; mse is the default, and absmax and mse exports write the same bytes."""
    from ernie_paddle.checkpoint.folder import read_canonical, write_checkpoint
    from ernie_paddle.export.pipeline import export
    from ernie_paddle.export.verify import compare
    from ernie_paddle.ort.runtime import OnnxCausalLM
    from ernie_paddle.paddle.modeling import Ernie4_5_MoeForCausalLM

    d, cfg = ckpt_factory("mse-scales", seed=21, tie_word_embeddings=False)  # a tied head is quantised apart
    out = str(tmp_path / "mse")
    export(d, out, precision="int4", verify=False, kv_cache="fp32")
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert (manifest["quantization"], manifest["block_scales"]) == ("rtn", "mse")
    ref_dir = str(tmp_path / "dequantized")
    write_checkpoint(cfg, ((m.canonical, quantize.round_trip(m, a, 4, 32, "mse")) for m, a in read_canonical(d, cfg)),
                     ref_dir, dtype="float32")
    rng = np.random.default_rng(3)
    figures = compare(Ernie4_5_MoeForCausalLM.from_pretrained(ref_dir), OnnxCausalLM(out),
                      [rng.integers(3, cfg.vocab_size, 12).tolist()], greedy_tokens=16)
    assert figures["max_abs_logit_diff"] <= 1e-4 and figures["greedy_identical_prompts"] == 1
    absmax = str(tmp_path / "absmax")
    export(d, absmax, precision="int4", verify=False, kv_cache="fp32", quantizer=RoundToNearest("absmax"))
    assert json.load(open(os.path.join(absmax, "manifest.json")))["block_scales"] == "absmax"
    sizes = [os.path.getsize(os.path.join(f, "model.onnx.data")) for f in (out, absmax)]
    assert sizes[0] == sizes[1]


def test_cli_export_block_scales(tmp_path, capsys):
    from ernie_paddle.cli.paddle_cli import main

    out = str(tmp_path / "shipped-absmax")
    assert main(["export", "--out", out, "--precision", "int4", "--block-size", "128", "--block-scales", "absmax",
                 "--no-verify"]) == 0
    m = json.load(open(os.path.join(out, "manifest.json")))
    assert (m["precision"], m["block_size"], m["quantization"], m["block_scales"]) == ("int4", 128, "rtn", "absmax")
    with pytest.raises(SystemExit) as e:
        main(["export", "--out", str(tmp_path / "bad"), "--precision", "int4", "--block-scales", "minmax"])
    assert e.value.code == 2
    assert "argument --block-scales: invalid choice: 'minmax'" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "bad")
