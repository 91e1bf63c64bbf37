"""Every golden case (../shared/golden, produced by the official vllm-omni code) reproduced by the
model that the real converter makes from the golden release-layout checkpoint, in float32.

Tolerance (golden README): floats max|a − b| ≤ 1e-4 · max(1, max|ref|), logits 1e-3 absolute,
codes exactly.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from conftest import assert_close

from mlx_speech import generate, stream_generate

TEXT = "Hello world, this is a test."
VOICE = "casual_male"


class _OffsetCache:
    """A KV cache that starts at RoPE position ``offset`` with no earlier keys (case a2)."""

    def __init__(self, offset: int):
        self.offset, self.kv = offset, None

    def update_and_fetch(self, k, v):
        if self.kv is not None:
            k, v = mx.concatenate([self.kv[0], k], axis=2), mx.concatenate([self.kv[1], v], axis=2)
        self.kv = (k, v)
        self.offset += k.shape[2]
        return k, v


def test_a1_backbone_from_ids(model, cases):
    c = cases["a1_backbone_ids"]
    emb = model.backbone.embed_tokens(c["input_ids"].astype(mx.int32))
    assert_close(emb, c["embeddings"])
    h = model(emb[None])[0]
    assert_close(h, c["hidden"])
    logits = model.backbone.embed_tokens.as_linear(h)  # tied head: unused for TTS, checks the table
    assert np.abs(np.array(logits) - np.array(c["logits"])).max() <= 1e-3


def test_a1_backbone_layer_outputs(model, cases):
    c = cases["a1_backbone_ids"]
    x = model.backbone.embed_tokens(c["input_ids"].astype(mx.int32))[None]
    for i, layer in enumerate(model.backbone.layers):
        x = layer(x, mask="causal")
        assert_close(x[0], c[f"layer_{i}_out"])


def test_a2_backbone_rope_offset(model, cases):
    c = cases["a2_backbone_embeds"]
    start = int(c["positions"][0].item())
    assert np.array_equal(np.array(c["positions"]), np.arange(start, start + c["positions"].shape[0]))
    cache = [_OffsetCache(start) for _ in model.backbone.layers]
    assert_close(model(c["input_embeds"][None], cache)[0], c["hidden"])


def test_b_audio_code_embedding(model, cases):
    c = cases["b_audio_embedding"]
    codes = c["codes"].astype(mx.int32)
    assert np.array_equal(np.array(codes + model._offsets), np.array(c["flat_indices"]))
    assert_close(model.audio_code_embeddings(codes), c["embedding"])


def test_c_semantic_head(model, cases):
    c = cases["c_semantic_head"]
    head = model.acoustic_transformer
    assert_close(head.semantic_codebook_output(c["hidden"]), c["logits_raw"])
    masked, ref = np.array(head.semantic_logits(c["hidden"])), np.array(c["logits_masked"])
    assert np.array_equal(np.isfinite(masked), np.isfinite(ref))
    assert np.abs(masked[np.isfinite(ref)] - ref[np.isfinite(ref)]).max() <= 1e-3
    assert np.array_equal(masked.argmax(-1), np.array(c["argmax"]))


@pytest.mark.parametrize("case", ["d1_velocity_t3of7", "d2_velocity_t0.37"])
def test_d_velocity(model, cases, case):
    c = cases[case]
    head = model.acoustic_transformer
    t_emb = head.time_embedding(c["t"])
    assert_close(t_emb, c["t_emb"])
    time_tok, llm_tok = head.time_projection(t_emb), head.llm_projection(c["llm_hidden"])
    assert_close(mx.concatenate([head.input_projection(c["x_t"])[:, None], time_tok[:, None],
                                 llm_tok[:, None]], axis=1),
                 c["transformer_input"][:2])
    assert_close(c["transformer_input"][2:, 2], np.zeros_like(np.array(c["transformer_input"][2:, 2])))
    v_cond = head.velocity(c["x_t"], time_tok, llm_tok)
    v_uncond = head.velocity(c["x_t"], time_tok, mx.zeros_like(llm_tok))
    assert_close(v_cond, c["v_cond"])
    assert_close(v_uncond, c["v_uncond"])
    assert_close(1.2 * v_cond - 0.2 * v_uncond, c["v_cfg"])


def test_e1_flow_frame(model, cases):
    c = cases["e1_flow_frame"]
    head = model.acoustic_transformer
    x = head.sample_acoustic(c["llm_hidden"], c["x0"], steps=7, cfg_alpha=1.2)
    assert_close(x, c["x_final"])
    codes = head(c["llm_hidden"], c["x0"], steps=7, cfg_alpha=1.2)
    assert np.array_equal(np.array(codes), np.array(c["codes"]))


def test_e1_flow_trajectory(model, cases):
    """Step by step: the CFG velocity and Euler state after each of the 7 steps."""
    c = cases["e1_flow_frame"]
    head = model.acoustic_transformer
    assert_close(mx.array(np.linspace(0, 1, 8, dtype=np.float32)), c["timesteps"])
    dts, time_tokens, _ = head._schedule(7)
    cond = head.llm_projection(c["llm_hidden"])
    x = c["x0"]
    for k, dt in enumerate(dts):
        tt = mx.broadcast_to(time_tokens[k], cond.shape)
        v = 1.2 * head.velocity(x, tt, cond) - 0.2 * head.velocity(x, tt, mx.zeros_like(cond))
        assert_close(v, c["velocities_cfg"][:, k])
        x = x + v * dt
        assert_close(x, c["trajectory"][:, k + 1])


def test_e2_end_audio_frame(model, cases):
    c, e1 = cases["e2_flow_frame_eoa"], cases["e1_flow_frame"]
    codes = np.array(model.acoustic_transformer(e1["llm_hidden"], e1["x0"]))
    semantic = np.array(c["semantic_code"])
    # The reference feeds the semantic code in; our head computes it, so pick the rows that agree.
    acoustic = np.where((semantic == 1)[:, None], 2, codes[:, 1:])
    assert np.array_equal(acoustic[1], np.array(c["acoustic_codes"])[1])
    assert np.array_equal(np.array(c["acoustic_codes"])[0], np.full(36, 2))


@pytest.mark.parametrize("case", ["f1_codec", "f2_codec_eoa_cut"])
def test_f_codec_waveform(model, cases, case):
    c = cases[case]
    codes = np.array(c["codes"])
    end = np.nonzero(codes[:, 0] == 1)[0]
    codes = codes[: end[0]] if len(end) else codes  # decoding cuts at the first END_AUDIO
    wave = model.audio_tokenizer.decode(mx.array(codes, dtype=mx.int32)[None])[0]
    assert_close(wave, c["waveform"])


def _prompt(model, cases):
    g = cases["g1_e2e"]
    ids = model.tokenizer.encode_speech(TEXT, VOICE)
    assert ids == np.array(g["prompt_ids"]).tolist()
    return ids


def test_g1_prompt_and_prefill(model, cases):
    g = cases["g1_e2e"]
    ids = _prompt(model, cases)
    assert_close(model.voice(VOICE), g["voice_embedding"], rel=0)
    emb = model.prompt_embeddings(mx.array(ids), model.voice(VOICE))
    assert_close(emb, g["prompt_embeds"])
    assert_close(model(emb[None])[0, -1], g["prefill_hidden_last"])


@pytest.mark.parametrize("case", ["g1_e2e", "g2_e2e_eoa"])
def test_g_teacher_forced_hidden(model, cases, case):
    """Feeding the reference codes back gives the reference hidden state of every frame."""
    g, codes = cases[case], cases[case]["codes"].astype(mx.int32)
    emb = model.prompt_embeddings(mx.array(_prompt(model, cases)), model.voice(VOICE))
    cache = model.make_cache()
    h = model(emb[None], cache)[:, -1]
    hidden = [h]
    for k in range(codes.shape[0] - 1):
        h = model(model.audio_code_embeddings(codes[k : k + 1])[:, None], cache)[:, -1]
        hidden.append(h)
    hidden = mx.concatenate(hidden)
    assert_close(hidden, g["frame_hidden"])
    if "semantic_logits_masked" in g:
        ref = np.array(g["semantic_logits_masked"])
        ours = np.array(model.acoustic_transformer.semantic_logits(hidden))
        assert np.array_equal(np.isfinite(ours), np.isfinite(ref))
        assert np.abs(ours[np.isfinite(ref)] - ref[np.isfinite(ref)]).max() <= 1e-3


def test_g1_end_to_end(model, cases):
    g = cases["g1_e2e"]
    n = g["codes"].shape[0]
    result = generate(model, TEXT, VOICE, noise=g["noise"], max_frames=n)
    assert np.array_equal(result.codes, np.array(g["codes"]))
    assert result.finish_reason == "length"
    assert result.sample_rate == 24000
    assert result.audio.dtype == np.float32
    assert_close(result.audio, g["waveform"])


def test_g2_end_to_end_stops_at_end_audio(model, cases):
    g = cases["g2_e2e_eoa"]
    ref_codes = np.array(g["codes"])
    assert ref_codes[-1, 0] == 1  # the reference's last frame is END_AUDIO
    result = generate(model, TEXT, VOICE, noise=g["noise"], max_frames=g["noise"].shape[0])
    assert result.finish_reason == "stop"
    assert np.array_equal(result.codes, ref_codes[:-1])  # END frame neither kept nor decoded
    assert len(result.audio) == 1920 * (len(ref_codes) - 1)
    assert_close(result.audio, g["waveform"])


def test_g2_streamed_equals_reference(model, cases):
    g = cases["g2_e2e_eoa"]
    chunks = list(stream_generate(model, TEXT, VOICE, noise=g["noise"], max_frames=12,
                                  first_chunk_frames=1, chunk_frames=3))
    assert [c.finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1].finish_reason == "stop"
    assert [len(c.codes) for c in chunks] == [1, 3, 3, 1]
    assert_close(np.concatenate([c.audio for c in chunks]), g["waveform"])
