"""ImageFolder layout: ``root/<class>/<image>``, classes sorted by folder name."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from convscale.data.config import DataConfig
from convscale.data.indexed import IndexedSource
from convscale.data.loading import IMAGE_EXTENSIONS, FileReader, check_heldout_fraction, stratified_split
from convscale.data.transforms import TransformSpec
from convscale.errors import UserError


def scan_folder(root: str, what: str = "path") -> tuple[list[str], list[str], np.ndarray]:
    """(class names, image paths, labels) of an ImageFolder tree; files are listed, not opened.

    Images may sit at any depth under their class folder; hidden files and folders are ignored.
    """
    top = Path(root).expanduser()
    if not top.exists():
        raise UserError(f"data {what} {top} does not exist; point it at a folder with one sub-folder per class")
    if not top.is_dir():
        raise UserError(f"data {what} {top} is not a folder; kind 'folder' needs root/<class>/<image> files")
    classes = sorted(p.name for p in top.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise UserError(f"data {what} {top} has no class sub-folders; put images in one sub-folder per class")
    paths: list[str] = []
    labels: list[int] = []
    seen: dict[str, str] = {}  # real path of every image -> the path it was first found at
    top_real = os.path.realpath(top)
    for label, name in enumerate(classes):
        found = []
        class_real = os.path.realpath(top / name)
        for dirpath, dirnames, filenames in os.walk(top / name, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for d in dirnames:  # a linked folder may lead out of the data (fine), not back into it
                _check_link(os.path.join(dirpath, d), top_real, class_real)
            for f in sorted(filenames):
                if f.startswith(".") or not f.lower().endswith(IMAGE_EXTENSIONS):
                    continue
                path = os.path.join(dirpath, f)
                real = os.path.realpath(path)
                if real in seen:  # a linked image would be trained on twice, or held out and trained on
                    raise UserError(f"image {path} is the same file as {seen[real]} (a link); "
                                    f"keep one copy per image in {top}")
                seen[real] = path
                found.append(path)
        if not found:
            raise UserError(
                f"class folder {top / name} has no images ({', '.join(IMAGE_EXTENSIONS)}); "
                "add images or remove the folder"
            )
        paths.extend(found)
        labels.extend([label] * len(found))
    return classes, paths, np.asarray(labels, dtype=np.int64)


def _check_link(path: str, top_real: str, class_real: str) -> None:
    """UserError if the folder ``path`` is a link back into the data outside its own class
    folder, or to a folder above its own: walking it would loop or file images under the wrong class."""
    if not os.path.islink(path):
        return
    real = os.path.realpath(path)
    inside = lambda parent: real == parent or real.startswith(parent + os.sep)
    above = os.path.realpath(os.path.dirname(path))
    if inside(top_real) and not inside(class_real) or above == real or above.startswith(real + os.sep):
        raise UserError(f"folder link {path} leads back to {real} (a loop or another class's images); "
                        f"remove the link or replace it by the images it should hold")


class FolderSource(IndexedSource):
    """Images in class folders; held out: ``cfg.heldout_path`` (same layout) or a seeded
    stratified ``cfg.heldout_fraction`` of the training folder."""

    def __init__(self, cfg: DataConfig, flip: bool = True):
        if cfg.path is None:
            raise UserError("data kind 'folder' needs a path; set data.path to root/<class>/<image> folders")
        check_heldout_fraction(cfg.heldout_fraction)
        classes, paths, labels = scan_folder(cfg.path)
        if cfg.heldout_path is not None:
            held_classes, held_paths, held_labels = scan_folder(cfg.heldout_path, "heldout_path")
            unknown = sorted(set(held_classes) - set(classes))
            if unknown:
                raise UserError(
                    f"held-out class folder '{unknown[0]}' is not a training class; "
                    f"rename or remove it in {cfg.heldout_path}"
                )
            remap = np.asarray([classes.index(c) for c in held_classes], dtype=np.int64)
            train_idx, train_paths = np.arange(len(paths)), paths
            held_paths_sel, held_labels_sel = held_paths, remap[held_labels]
        else:
            train_idx, held_idx = stratified_split(labels, cfg.heldout_fraction, cfg.seed)
            train_paths = [paths[i] for i in train_idx]
            held_paths_sel, held_labels_sel = [paths[i] for i in held_idx], labels[held_idx]
        self.classes = classes
        spec = TransformSpec(cfg.resolution, flip=flip)
        super().__init__(
            cfg, FileReader(), spec, train_paths, labels[train_idx], held_paths_sel, held_labels_sel, len(classes)
        )
