"""The loaders ship uint8 images and the model normalises them on its device: the network input equals the
former float32 pipeline's (normalise in the loader, erase with value 0 after it) to 1e-6."""
from __future__ import annotations

import pytest
import torch
from torchvision.transforms import v2

from reid_core.config import DataConfig, ModelConfig
from reid_core.data import (IMAGENET_MEAN, IMAGENET_STD, PixelNormalize, build_dataset, build_test_loader,
                            build_test_transform, build_train_loader, build_train_transform, read_image, synthetic)
from reid_core.models import build_model

H, W = 48, 24


def cfg(**kw) -> DataConfig:
    base = dict(height=H, width=W, batch_size=8, num_instance=2, workers=0, padding=5, flip_prob=0.5,
                random_erasing=0.5, autoaug=True, autoaug_prob=0.5)
    base.update(kw)
    return DataConfig(**base)


def former_train_transform(c: DataConfig) -> v2.Compose:
    """The float32 pipeline the loaders used before (normalise in the loader, then erase with 0)."""
    return v2.Compose([v2.Resize((c.height, c.width), antialias=True),
                       v2.RandomApply([v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET)], p=c.autoaug_prob),
                       v2.RandomHorizontalFlip(c.flip_prob), v2.RandomCrop((c.height, c.width), padding=c.padding),
                       v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
                       v2.RandomErasing(p=c.random_erasing, value=0)])


def former_test_transform(c: DataConfig) -> v2.Compose:
    return v2.Compose([v2.Resize((c.height, c.width), antialias=True), v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = synthetic.generate(tmp_path_factory.mktemp("uint8") / "data", "market1501", ids=12, cams=2,
                              images_per_id_cam=2, height=64, width=32, seed=3)
    return build_dataset("market1501", root)


def test_train_and_test_transforms_give_the_former_network_input():
    norm = PixelNormalize()
    new, old = build_train_transform(cfg()), former_train_transform(cfg())
    erased = 0
    for seed in range(40):
        image = torch.randint(0, 256, (3, 61, 29), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
        torch.manual_seed(seed)
        ours = new(image)
        torch.manual_seed(seed)
        theirs = old(image)
        assert ours.dtype == torch.uint8 and ours.shape == (4, H, W)
        erased += int(ours[3].any())
        assert (norm(ours.unsqueeze(0))[0] - theirs).abs().max() <= 1e-6, seed
    assert 5 < erased < 35  # random erasing (p = 0.5) did erase, and not always
    image = torch.randint(0, 256, (3, 61, 29), dtype=torch.uint8)
    ours = build_test_transform(cfg())(image)
    assert ours.dtype == torch.uint8 and ours.shape == (3, H, W)
    assert (norm(ours.unsqueeze(0))[0] - former_test_transform(cfg())(image)).abs().max() <= 1e-6


def test_training_batch_from_the_loader_equals_the_former_batch(dataset):
    loader = build_train_loader(dataset, cfg(), seed=4)
    indices = loader.sampler.batches(0)[0]
    torch.manual_seed(11)
    batches = iter(loader.loader)  # the DataLoader's iterator: creating it draws a seed from the global RNG
    state = torch.get_rng_state()
    images = next(batches).images
    torch.set_rng_state(state)
    old = former_train_transform(cfg())
    expected = torch.stack([old(read_image(dataset.train[i].path)) for i in indices])
    assert images.dtype == torch.uint8 and images.shape == (8, 4, H, W)
    assert (PixelNormalize()(images) - expected).abs().max() <= 1e-6


def test_model_normalises_uint8_on_its_device_and_passes_normalised_floats(dataset):
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="resnet18"), num_classes=6).eval()
    images, _, _ = next(iter(build_test_loader(dataset.gallery, cfg(), batch_size=6)))
    former = torch.stack([former_test_transform(cfg())(read_image(s.path)) for s in dataset.gallery[:6]])
    with torch.no_grad():
        assert torch.allclose(model.test_features(images), model.test_features(former), atol=1e-5)
        # channels_last (the trainer's layout on CUDA) gives the same input
        last = images.contiguous(memory_format=torch.channels_last)
        assert torch.allclose(model.input_norm(last), model.input_norm(images), atol=0, rtol=0)
    # nothing new in the state dict: checkpoints written before load as they did
    assert not any("input_norm" in key for key in model.state_dict())
    assert model.input_norm(former) is former


def test_erased_pixels_become_the_mean_colour_and_bad_inputs_are_named():
    norm = PixelNormalize()
    x = torch.full((2, 4, 5, 6), 200, dtype=torch.uint8)
    x[:, 3] = 0
    x[1, 3, 1:3, 2:5] = 1
    out = norm(x)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 5, 6)
    assert torch.all(out[1, :, 1:3, 2:5] == 0) and torch.all(out[0] > 0)
    assert int((out[1] == 0).sum()) == 3 * 2 * 3
    with pytest.raises(ValueError, match="uint8"):
        norm(torch.zeros(2, 3, 5, 6, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"\(2, 5, 5, 6\)"):
        norm(torch.zeros(2, 5, 5, 6, dtype=torch.uint8))
