"""Mixed precision on the CPU: bfloat16 and float16 (with a CPU GradScaler) steps against the float32
step, the non-finite guard, resuming across AMP settings, and checkpoints that load weights-only."""
from __future__ import annotations

import copy

import pytest
import torch

from reid_core.config import Config
from reid_core.data import synthetic
from reid_core.engine.finite import NonFiniteError
from reid_core.engine.trainer import Trainer, TrainStep
from reid_core.models import build_model
from reid_core.moreid import build_framework

CPU = torch.device("cpu")
# Inputs of 64 x 32: at 32 x 16, ResNet layer3 sees 2 x 1 maps, where PyTorch 2.14's CPU bfloat16 convolution
# gives run-to-run different outputs (seen while writing these tests; float32 is exact).


def _cfg(**overrides) -> Config:
    base = {"model.arch": "resnet18", "data.batch_size": 8, "data.num_instance": 4, "framework.dict_size": 32,
            "framework.name": "moreid", "loss.name": "he", "optim.name": "sgd", "optim.lr": 0.05,
            "train.device": "cpu"}
    return Config().replace({**base, **overrides})


def _batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 3, 64, 32, generator=g), torch.tensor([3, 3, 3, 3, 5, 5, 5, 5])


def _step(cfg: Config, **amp):
    torch.manual_seed(0)
    model = build_model(cfg.model, num_classes=8)
    framework = build_framework(cfg, model).train()
    return TrainStep(cfg, framework, model, CPU, iters_per_epoch=10, **amp), framework


def _delta(framework, before) -> torch.Tensor:
    """Every parameter's change in one vector (f_q's by the optimizer step, f_k's by the momentum update)."""
    after = framework.state_dict()
    return torch.cat([(after[k] - before[k]).flatten() for k in before if before[k].is_floating_point()
                      and not k.startswith("dictionary.")])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_autocast_step_is_close_to_the_float32_step(dtype):
    """One SGD step from the same state on the same batch. Low-precision gradients of a randomly
    initialised ResNet differ from float32 most in the early BatchNorm layers (sums that nearly cancel):
    measured on this model, the whole update differs by about 25 % (bf16) and 8 % (fp16) in norm, with a
    cosine above 0.97; the CE term alone by 1.5 % (bf16)."""
    cfg = _cfg()
    ref, ref_fw = _step(cfg)
    amp, amp_fw = _step(cfg, amp=True, amp_dtype=dtype)
    assert amp.scaler.is_enabled() == (dtype == torch.float16)  # bf16 needs no scaler
    if dtype == torch.float16:
        # A scale under which this toy model's fp16 gradients do not overflow, so the step is taken (the
        # default 65536 overflows and skips it: test_fp16_overflow_skips_the_step_without_an_error).
        amp.scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    seen = []
    amp_fw.metric_loss.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    start = copy.deepcopy(ref_fw.state_dict())
    images, labels = _batch(0)
    out_ref, out_amp = ref(images, labels), amp(images, labels)
    # distances, losses and keys stay float32 under autocast
    assert seen == [torch.float32]
    assert out_amp.loss.dtype == out_amp.terms["metric"].dtype == out_amp.terms["ce"].dtype == torch.float32
    assert amp_fw.dictionary.keys.dtype == torch.float32 and amp_fw.dictionary.ptr == 8
    torch.testing.assert_close(out_amp.loss, out_ref.loss, rtol=2e-2, atol=0)
    torch.testing.assert_close(amp_fw.dictionary.keys, ref_fw.dictionary.keys, rtol=0.05, atol=0.05)
    d_ref, d_amp = _delta(ref_fw, start), _delta(amp_fw, start)
    assert d_ref.norm() > 0
    assert (d_amp - d_ref).norm() / d_ref.norm() < (0.35 if dtype == torch.bfloat16 else 0.15)
    assert torch.nn.functional.cosine_similarity(d_amp, d_ref, dim=0) > 0.95
    if dtype == torch.float16:  # the scaler took its step: no inf found, the scale kept
        assert amp.scaler.get_scale() == 256.0 and amp.scaler.state_dict()["_growth_tracker"] == 1


def test_fp16_overflow_skips_the_step_without_an_error():
    """GradScaler's own business: inf gradients at the default scale skip the step and halve the scale; the
    loss and keys are finite, so the guard records nothing and the keys are enqueued."""
    amp, framework = _step(_cfg(), amp=True, amp_dtype=torch.float16)
    params = {n: p.detach().clone() for n, p in framework.encoder.named_parameters()}
    amp(*_batch(0))
    assert amp.scaler.get_scale() == 32768.0
    assert all(torch.equal(p, params[n]) for n, p in framework.encoder.named_parameters())
    assert framework.dictionary.ptr == 8
    amp.guard.check()


def _poison_image(images, labels):
    # Loader batches are uint8, which cannot hold a NaN: normalise them as the model would (it passes
    # floating-point input through unchanged), then poison one image.
    from reid_core.data.normalize import PixelNormalize

    images = PixelNormalize()(images) if not images.is_floating_point() else images.clone()
    images[2] = float("nan")
    return images, labels


@pytest.mark.parametrize("how, terms", [
    ("image", "loss/ce, loss/metric, keys"),
    ("classifier", "loss/ce"),
])
def test_a_non_finite_step_enqueues_nothing_and_stops_with_its_step_and_terms(how, terms):
    cfg = _cfg()
    step, framework = _step(cfg)
    for i in range(2):
        step(*_batch(i))
    dictionary = copy.deepcopy(framework.dictionary.state_dict())
    assert dictionary["ptr"] == 16
    step.guard.check()  # nothing yet
    if how == "image":
        images, labels = _poison_image(*_batch(2))
    else:  # the classifier alone: the CE loss is NaN, the keys and the metric loss are finite
        with torch.no_grad():
            framework.encoder.classifier.weight[0, 0] = float("nan")
        images, labels = _batch(2)
    step(images, labels)  # no host synchronization: nothing raised yet
    step(*_batch(3))  # a later step enqueues nothing either (f_q and f_k are NaN by now)
    for name, value in framework.dictionary.state_dict().items():
        assert torch.equal(value, dictionary[name]), name
    with pytest.raises(NonFiniteError, match=rf"non-finite {terms} in training step 3 \(iteration 2"):
        step.guard.check()


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    return synthetic.generate(tmp_path_factory.mktemp("precision") / "data", "market1501", ids=8, cams=2,
                              images_per_id_cam=2, height=32, width=16, seed=0)


def _trainer(root, out, amp: bool, dtype: str = "float16", **overrides) -> Trainer:
    cfg = _cfg(**{"data.dataset": "synthetic", "data.root": str(root), "data.height": 64, "data.width": 32,
                  "data.workers": 0, "train.iters_per_epoch": 2, "train.epochs": 1, "train.log_every": 1,
                  "train.amp_dtype": dtype, "train.output_dir": str(out), **overrides})
    return Trainer(cfg, amp=amp)


def test_trainer_stops_at_the_log_step_after_a_nan_image(tiny_root, tmp_path):
    trainer = _trainer(tiny_root, tmp_path / "nan", amp=False, **{"train.iters_per_epoch": 4,
                                                                  "train.log_every": 2})
    batches = [b for b, _ in zip(trainer._batches(), range(4))]
    batches[0] = (*_poison_image(*batches[0][:2]), *batches[0][2:])
    trainer._batches = lambda: iter(batches)
    with pytest.raises(NonFiniteError, match=r"non-finite loss/ce, loss/metric, keys in training step 1 "):
        trainer.train_epoch()
    assert trainer.iteration == 2  # detected at the first log step
    assert int(trainer.framework.dictionary.ptr) == 0 and (trainer.framework.dictionary.labels == -1).all()
    with pytest.raises(NonFiniteError):  # nothing poisoned is saved
        trainer.save_checkpoint(tmp_path / "nan" / "ckpt.pt")
    assert not (tmp_path / "nan" / "ckpt.pt").exists()
    trainer.close()


def test_resume_across_amp_settings_and_weights_only_checkpoints(tiny_root, tmp_path):
    """AMP off -> float16 -> bfloat16 -> off, each run resuming the previous one's checkpoint."""
    runs = [(False, "float16"), (True, "float16"), (True, "bfloat16"), (False, "bfloat16")]
    path = None
    for i, (amp, dtype) in enumerate(runs):
        trainer = _trainer(tiny_root, tmp_path / f"run{i}", amp=amp, dtype=dtype, **{"train.iters_per_epoch": 1})
        if path is not None:
            trainer.load_checkpoint(path)
            assert trainer.iteration == i
            if trainer.scaler.is_enabled():  # saved without a scaler: it starts at its initial scale
                assert trainer.scaler.get_scale() == 65536.0
        trainer.train_epoch()
        assert trainer.scaler.is_enabled() == (amp and dtype == "float16")
        path = trainer.save_checkpoint(tmp_path / f"run{i}" / "ckpt.pt")
        state = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain containers only
        assert state["iteration"] == i + 1 and bool(state["scaler"]) == trainer.scaler.is_enabled()
        trainer.close()


def test_amp_dtype_is_validated_by_name():
    from reid_core.config import ConfigError

    assert Config().train.amp_dtype == "float16"  # as before: fp16 with a GradScaler where AMP is on
    with pytest.raises(ConfigError, match="train.amp_dtype must be one of float16, bfloat16; got 'float8'"):
        Config().replace({"train.amp_dtype": "float8"})
    with pytest.raises(ValueError, match="amp_dtype must be torch.float16 or torch.bfloat16"):
        _step(_cfg(), amp=True, amp_dtype=torch.float32)
