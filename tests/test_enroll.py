"""Enrollment through the frozen codec decoder (issue 10): the latent decoder, the losses and
their gradients against NumPy, the fixed point, and the round trip on the golden tiny codec."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest

from mlx_speech.clip_prep import ClipError
from mlx_speech.enroll import (
    DEFAULT_STEPS,
    EnrollConfig,
    LatentSpace,
    compiled_step,
    decode_latent,
    enroll,
    optimize_codes,
)
from mlx_speech.spectral_loss import (
    SpectralLoss,
    SpectralLossConfig,
    frame_signal,
    hann_window,
    mel_filterbank,
    snr_db,
)
from mlx_speech.voice_codes import codes_to_voice
from mlx_speech.voice_file import Voice

# The round trip runs the default step count: the thresholds are for the defaults. Same-seed
# determinism holds at any step count, so it is checked on a short run.
ROUND_TRIP_SEEDS = (0, 1, 2)
DETERMINISM_STEPS = 20
FRAMES = 6


def random_walk_codes(model, seed: int, frames: int = FRAMES) -> np.ndarray:
    """(frames, 37) +2 codes: uniform semantic codes, acoustic levels walking by up to ±3 a frame."""
    c = model.audio_tokenizer.config
    rng = np.random.default_rng(1000 + seed)
    semantic = rng.integers(0, c.semantic_codebook_size, frames)
    acoustic = np.empty((frames, c.acoustic_dim), np.int64)
    acoustic[0] = rng.integers(0, c.acoustic_codebook_size, c.acoustic_dim)
    for t in range(1, frames):
        acoustic[t] = np.clip(acoustic[t - 1] + rng.integers(-3, 4, c.acoustic_dim), 0, c.acoustic_codebook_size - 1)
    return (np.concatenate([semantic[:, None], acoustic], axis=1) + 2).astype(np.int32)


def decode(model, codes) -> np.ndarray:
    return np.array(model.audio_tokenizer.decode(mx.array(np.asarray(codes))[None]))[0]


# ---- the latent decoder and the latent space -------------------------------------------------------
@pytest.mark.parametrize("frames", [FRAMES, 70])  # 70 crosses Codec.decode's 64-frame chunks
def test_decode_latent_equals_codec_decode(model, frames):
    codes = random_walk_codes(model, 7, frames)
    codec = model.audio_tokenizer
    latent = codec.quantizer(mx.array(codes)[None] - 2)
    got = np.array(decode_latent(codec, latent))[0]
    want = decode(model, codes)
    assert got.shape == want.shape == (frames * codec.config.samples_per_frame,)
    np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max())
    checkpointed = np.array(decode_latent(codec, latent, checkpoint=True))[0]
    np.testing.assert_array_equal(checkpointed, got)


def test_latent_from_codes_decodes_and_snaps_to_those_codes(model):
    codes = random_walk_codes(model, 3)
    codes[0, 1:] = 2  # the extreme FSQ levels are reachable too
    codes[1, 1:] = 22
    space = LatentSpace(model.audio_tokenizer)
    params = space.from_codes(codes)
    reference = model.audio_tokenizer.quantizer(mx.array(codes)[None] - 2)
    np.testing.assert_array_equal(space.snap(params), codes)
    # bit-exact, both ways: at the true codes every residual, hence every gradient, is exactly 0
    np.testing.assert_array_equal(np.array(space.quantized(params)), np.array(reference))
    np.testing.assert_array_equal(np.array(space.continuous(params)), np.array(reference))


def test_snap_is_the_nearest_codebook_row_and_the_rounded_level(model):
    c = model.audio_tokenizer.config
    space = LatentSpace(model.audio_tokenizer)
    rng = np.random.default_rng(5)
    params = {"semantic": mx.array(rng.standard_normal((1, 9, c.semantic_dim)).astype(np.float32)),
              "acoustic": mx.array(rng.standard_normal((1, 9, c.acoustic_dim)).astype(np.float32))}
    codes = space.snap(params)
    book = np.array(model.audio_tokenizer.quantizer.semantic_codebook.embedding, np.float64)
    z = np.array(params["semantic"], np.float64)[0] * float(space.scale)
    nearest = np.argmin(((z[:, None, :] - book[None]) ** 2).sum(-1), axis=1)
    np.testing.assert_array_equal(codes[:, 0] - 2, nearest)
    levels = c.acoustic_codebook_size
    value = np.array(params["acoustic"], np.float64)[0]
    np.testing.assert_array_equal(codes[:, 1:] - 2, np.clip(np.round((value + 1) / 2 * (levels - 1)), 0, levels - 1))


# ---- the spectral loss against NumPy ---------------------------------------------------------------
SMALL = SpectralLossConfig(resolutions=((64, 16), (128, 32)), sample_rate=8000, n_mels=8, mel_n_fft=128, mel_hop=32)


def numpy_loss(pred: np.ndarray, target: np.ndarray, c: SpectralLossConfig) -> float:
    """The loss of SpectralLoss written independently in float64 NumPy (frames by index)."""

    def frames(x, n_fft, hop):
        half = n_fft // 2
        padded = np.concatenate([np.zeros(half), x, np.zeros(half + hop)])
        count = -(-(x.size + 2 * half) // hop) - n_fft // hop + 1  # frames within the padded length
        return np.stack([padded[i * hop : i * hop + n_fft] for i in range(count)])

    def mag(x, n_fft, hop):
        s = np.fft.rfft(frames(x, n_fft, hop) * hann_window(n_fft), axis=-1)
        return np.sqrt(s.real**2 + s.imag**2 + c.eps)

    stft = 0.0
    for n_fft, hop in c.resolutions:
        mt, mp = mag(target, n_fft, hop), mag(pred, n_fft, hop)
        stft += np.sqrt(((mt - mp) ** 2).sum() + c.eps) / np.sqrt((mt**2).sum() + c.eps)
        stft += np.mean(np.abs(np.log(mt + c.log_eps) - np.log(mp + c.log_eps)))
    bank = mel_filterbank(c.sample_rate, c.mel_n_fft, c.n_mels).astype(np.float64)
    mel_t = np.log(mag(target, c.mel_n_fft, c.mel_hop) @ bank + c.log_eps)
    mel_p = np.log(mag(pred, c.mel_n_fft, c.mel_hop) @ bank + c.log_eps)
    return (c.stft_weight * stft / len(c.resolutions) + c.mel_weight * np.mean(np.abs(mel_t - mel_p))
            + c.l1_weight * np.mean(np.abs(target - pred)))


def test_framing_matches_indexing():
    x = np.arange(100, dtype=np.float32)
    got = np.array(frame_signal(mx.array(x), 32, 8))
    padded = np.concatenate([np.zeros(16), x, np.zeros(64)])
    for i in range(got.shape[0]):
        np.testing.assert_array_equal(got[i], padded[i * 8 : i * 8 + 32])
    assert (got.shape[0] - 1) * 8 + 32 >= 16 + x.size  # the last sample is in a frame


def test_mel_filterbank_covers_the_band():
    bank = mel_filterbank(24000, 1024, 80)
    assert bank.shape == (513, 80) and (bank >= 0).all()
    assert (bank.sum(axis=0) > 0).all()  # no empty filter
    assert (bank[1:-1].sum(axis=1) > 0).all()  # every inner bin feeds a filter


def test_spectral_loss_equals_numpy():
    rng = np.random.default_rng(0)
    target, pred = rng.standard_normal(900) * 0.3, rng.standard_normal(900) * 0.3
    got = SpectralLoss(SMALL)(mx.array(pred[None].astype(np.float32)), mx.array(target[None].astype(np.float32)))
    assert got.item() == pytest.approx(numpy_loss(pred, target, SMALL), rel=1e-4)


def test_spectral_loss_gradient_matches_finite_differences():
    """MLX's FFT backward against central differences of the NumPy loss in float64 (a PyTorch/MPS
    version of this method was silently wrong because of an STFT backward bug)."""
    rng = np.random.default_rng(1)
    target = rng.standard_normal(300) * 0.3
    pred = target + rng.standard_normal(300) * 0.1
    loss = SpectralLoss(SMALL)
    features = loss.target(mx.array(target[None].astype(np.float32)))
    grad = np.array(mx.grad(lambda p: loss.loss(p, features))(mx.array(pred[None].astype(np.float32))), np.float64)[0]
    h = 1e-6
    for _ in range(4):  # directional derivatives along random directions
        v = rng.standard_normal(300)
        fd = (numpy_loss(pred + h * v, target, SMALL) - numpy_loss(pred - h * v, target, SMALL)) / (2 * h)
        assert grad @ v == pytest.approx(fd, rel=2e-3, abs=1e-5)
    for i in rng.choice(300, 6, replace=False):  # and single samples
        e = np.zeros(300)
        e[i] = h
        fd = (numpy_loss(pred + e, target, SMALL) - numpy_loss(pred - e, target, SMALL)) / (2 * h)
        assert grad[i] == pytest.approx(fd, rel=2e-3, abs=1e-5)


def test_gradient_at_an_exact_match_is_finite_and_zero():
    target = mx.array(np.random.default_rng(2).standard_normal((1, 600)).astype(np.float32))
    loss = SpectralLoss(SMALL)
    value, grad = mx.value_and_grad(lambda p: loss.loss(p, loss.target(target)))(target)
    assert value.item() == pytest.approx(0.0, abs=1e-6)
    assert np.isfinite(np.array(grad)).all() and np.abs(np.array(grad)).max() == 0.0


def test_snr_db():
    x = np.array([1.0, -1.0, 1.0, -1.0])
    assert snr_db(x, x) == math.inf
    assert snr_db(x, 0.9 * x) == pytest.approx(20.0)


# ---- optimization ----------------------------------------------------------------------------------
def test_fixed_point_keeps_the_codes_at_zero_loss(model):
    """Started at the true codes' latent, enrollment of their audio keeps them: catches offset,
    sign, slope, padding and NaN-gradient bugs."""
    codes = random_walk_codes(model, 11)
    codes[2, 1:5] = [2, 22, 2, 22]  # extreme levels included
    target = decode(model, codes)
    result = optimize_codes(model, target, config=EnrollConfig(steps=40), init_codes=codes)
    np.testing.assert_array_equal(result.codes, codes)
    # ≈ 0: only the ε floor of spectral convergence, sqrt(ε)/‖S‖, remains
    assert max(result.losses) < 1e-6 and result.final_loss < 1e-6


def test_steps_descend_from_a_perturbed_start(model):
    """From near the true codes the loss falls, in both phases (a sign or slope error in the
    gradient would make it rise)."""
    codes = random_walk_codes(model, 12)
    codec = model.audio_tokenizer
    space = LatentSpace(codec)
    loss_fn = SpectralLoss()
    target = loss_fn.target(codec.decode(mx.array(codes)[None]))
    rng = np.random.default_rng(0)
    exact = space.from_codes(codes)
    for quantized in (False, True):
        params = {k: v + mx.array(0.04 * rng.standard_normal(v.shape).astype(np.float32)) for k, v in exact.items()}
        if quantized:  # move a few acoustic codes a level away, so the quantized loss is not 0
            params["acoustic"] = params["acoustic"] + mx.array(np.where(rng.random(params["acoustic"].shape) < 0.1, 0.1, 0.0).astype(np.float32))
        step, _ = compiled_step(space, loss_fn, target, params, 30, 0.01, quantized)
        losses = [step().item() for _ in range(30)]
        assert losses[-1] < 0.5 * losses[0], (quantized, losses[0], losses[-1])


@pytest.fixture(scope="module")
def round_trips(model):
    """Enrollment (default steps) of the audio of random-walk codes, per seed."""
    out = {}
    for seed in ROUND_TRIP_SEEDS:
        codes = random_walk_codes(model, seed)
        target = decode(model, codes)
        calls = []
        voice = enroll(model, target, 24000, seed=seed, preprocess=False, progress=lambda *a, calls=calls: calls.append(a))
        out[seed] = (codes, target, voice, calls)
    return out


@pytest.mark.parametrize("seed", ROUND_TRIP_SEEDS)
def test_round_trip_recovers_the_audio(model, round_trips, seed):
    codes, target, voice, calls = round_trips[seed]
    resynth = decode(model, voice.codes)
    assert snr_db(target, resynth) >= 14.0
    assert (voice.codes[:, 0] == codes[:, 0]).sum() >= 4
    assert np.mean(np.abs(voice.codes[:, 1:].astype(int) - codes[:, 1:]) <= 1) >= 0.45
    start, final = float(voice.metadata["start_loss"]), float(voice.metadata["final_loss"])
    assert final <= 0.1 * start
    # the final loss is the snapped codes' own: recomputed here from their decoded audio
    loss = SpectralLoss().loss(mx.array(resynth)[None], SpectralLoss().target(mx.array(target)[None])).item()
    assert loss == pytest.approx(final, rel=1e-4)
    assert [c[:2] for c in calls] == [(i, DEFAULT_STEPS) for i in range(1, DEFAULT_STEPS + 1)]


def test_round_trip_voice_is_the_codes_embedding_sum(model, round_trips):
    voice = round_trips[0][2]
    assert voice.embedding.dtype == np.float32
    assert voice.embedding.shape == (FRAMES + 1, model.config.backbone.dim)
    assert voice.codes.shape == (FRAMES, 37)
    np.testing.assert_array_equal(voice.embedding, codes_to_voice(model, voice.codes))
    m = voice.metadata
    assert (m["frames"], m["steps"], m["seed"], m["preprocess"]) == (str(FRAMES), str(DEFAULT_STEPS), "0", "false")
    assert float(m["source_seconds"]) == pytest.approx(FRAMES * 0.08)


def test_same_seed_same_codes_and_another_seed_another_start(model):
    target = decode(model, random_walk_codes(model, 4))
    runs = [enroll(model, target, 24000, steps=DETERMINISM_STEPS, seed=s, preprocess=False) for s in (5, 5, 6)]
    np.testing.assert_array_equal(runs[0].codes, runs[1].codes)
    np.testing.assert_array_equal(runs[0].embedding, runs[1].embedding)
    assert runs[0].metadata["start_loss"] == runs[1].metadata["start_loss"] != runs[2].metadata["start_loss"]


def test_saved_voice_loads(model, round_trips, tmp_path):
    voice = round_trips[1][2]
    path = voice.save(tmp_path / "me.safetensors")
    loaded = Voice.load(path, model.config.backbone.dim)
    np.testing.assert_array_equal(loaded.embedding, voice.embedding)
    np.testing.assert_array_equal(loaded.codes, voice.codes)
    assert loaded.metadata["final_loss"] == voice.metadata["final_loss"]


def test_command_line_defaults_are_enrollments():
    # clone.py repeats them so that --help and argument checks need no MLX import
    from mlx_speech import clone
    from mlx_speech import enroll as enroll_module

    assert (clone.DEFAULT_STEPS, clone.MAX_STEPS, clone.DEFAULT_MAX_SECONDS) == (
        DEFAULT_STEPS, enroll_module.MAX_STEPS, enroll_module.DEFAULT_MAX_SECONDS)
    config = EnrollConfig()
    assert config.steps == DEFAULT_STEPS and config.continuous_steps + config.ste_steps == DEFAULT_STEPS


@pytest.mark.parametrize("kwargs, error", [
    ({"steps": 0}, ValueError), ({"steps": 2.5}, ValueError), ({"seed": -1}, ValueError),
    ({"sample_rate": 16000}, ClipError),
])  # fmt: skip
def test_enroll_refuses_bad_arguments(model, kwargs, error):
    kwargs = {"sample_rate": 24000, **kwargs}
    audio = np.zeros(1920 * 2, np.float32)
    with pytest.raises(error) as e:
        enroll(model, audio, kwargs.pop("sample_rate"), preprocess=False, **kwargs)
    assert "\n" not in str(e.value)
