"""``dfm prepare``: encode an image dataset through a VAE once, into a latent directory.

Training in latent space then reads the posterior means and stds from disk instead of running the
encoder every step (see ``dfm.data.latents`` for the format). Images are encoded without flips.

Usage::

    dfm prepare --data data/pets --vae path/to/vae --out data/pets-latents --resolution 256 --batch-size 32
    python -m dfm.data.prepare --data data/pets --vae path/to/vae --out data/pets-latents --resolution 256

Run it again with ``--split test --data data/pets-test`` into the same ``--out`` to add a test split.

A run that fails (an unreadable or too small image, an interruption) leaves ``--out`` as it was: the latents are
written into a hidden folder beside it (``.<name>.partial-*``) and moved into place only when they are complete.
Images smaller than ``--resolution`` are an error unless ``--upscale``; unreadable ones unless ``--skip-bad``.

Captions (fine-tuning a diffusers FLUX / SD3 model, see :mod:`dfm.adapters`): with ``--text-encoder DIR`` (the
FLUX or SD3 directory: its pipeline's text encoders are loaded, without transformer and VAE) every image's caption
is encoded once and stored next to its latent, plus the empty prompt once (see :mod:`dfm.data.latents`). Captions
come from ``captions.jsonl`` at the folder's root (``{"file": "<path in the folder>", "text": "..."}`` per line) or
from one ``<image stem>.txt`` beside each image (:func:`dfm.text.read_captions`); every image needs one.
``--max-text-length`` (default 128) is the number of T5 tokens kept: 512 tokens of 4096 features in bf16 are
4 MiB per image, 128 are 1 MiB. The embeddings are stored in ``--dtype``, as the latents::

    dfm prepare --data data/pets --vae black-forest-labs/FLUX.1-dev --text-encoder models/FLUX.1-dev \
        --out data/pets-flux --resolution 512 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from dfm.data import DFMDataset, build_dataset
from dfm.data.latents import INFO_FILE, LatentWriter, is_latent_dir, read_latent_info
from dfm.data.vae import VAE, load_vae
from dfm.text import TextEncoder, read_captions

__all__ = ["add_prepare_parser", "main", "prepare_latents", "run_prepare"]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def prepare_latents(
    data: str,
    vae: str | VAE,
    out: str | Path,
    resolution: int,
    batch_size: int = 32,
    split: str = "train",
    device: str = "cpu",
    shard_size: int = 10_000,
    dtype: str = "float32",
    num_workers: int = 0,
    upscale: bool = False,
    skip_bad: bool = False,
    progress: bool = True,
    text_encoder: str | TextEncoder | None = None,
    max_text_length: int = 128,
    text_encoder_source: str | None = None,
) -> Path:
    """Encode ``data`` (an image folder or ``"fashion-mnist"``) into the latent directory ``out``.

    Returns ``out``. Existing splits in ``out`` are kept when they come from the same VAE and
    resolution; the split being written is replaced. On an error ``out`` is left as it was (see the module doc).

    ``text_encoder``: a diffusers FLUX / SD3 directory, or any ``prompts -> TextCondition`` callable (then
    ``text_encoder_source`` is what is recorded as the encoder, for ``dfm sample --prompt``): the images' captions
    are encoded and stored with the latents, the folder's classes are ignored (see the module docstring).
    """
    _check_settings(batch_size, dtype)
    if max_text_length < 1:
        raise ValueError(f"--max-text-length {max_text_length} must be at least 1")
    if not isinstance(vae, VAE):
        vae = load_vae(vae, device=device)
    latent_shape = vae.latent_shape(vae.latent_channels, resolution)
    dataset = _image_dataset(data, vae, resolution, split, upscale, skip_bad)
    captions, text = None, None
    if text_encoder is not None:
        captions = _captions(data, dataset)
        if isinstance(text_encoder, (str, Path)):
            from dfm.text import load_text_encoder

            source = str(Path(text_encoder).resolve())
            text_encoder = load_text_encoder(source, max_text_length, device)
        else:
            source = text_encoder_source or getattr(text_encoder, "__name__", "custom")
        text = {"encoder": source, "max_length": int(max_text_length)}
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; choose a directory")
    class_names = [] if text is not None else dataset.class_names
    old_splits = _kept_splits(out, split, latent_shape, vae, resolution, class_names, text)
    with _staged(out) as stage:
        writer = LatentWriter(
            stage,
            latent_shape=latent_shape,
            vae=vae.source,
            shift=vae.shift,
            scale=vae.scale,
            class_names=class_names,
            shard_size=shard_size,
            dtype=_DTYPES[dtype],
            extra={"image_resolution": resolution, "source_data": str(data), "padding": int(dataset.padding)},
            text=text,
        )
        writer.info["splits"].update(old_splits)
        if text_encoder is not None:
            writer.set_empty_prompt(text_encoder([""]))
        _encode(dataset, vae, writer, split, batch_size, num_workers, progress, captions, text_encoder)
    return out


@contextmanager
def _staged(out: Path) -> Iterator[Path]:
    """A new hidden folder beside ``out`` to write into, moved into ``out`` when the block ends without an error;
    on an error it is removed, with the folders above ``out`` that this made, so that ``out`` is left as it was."""
    made = []  # the missing folders above out, outermost first
    for folder in reversed(out.absolute().parents):
        if not folder.exists():
            folder.mkdir(exist_ok=True)
            made.append(folder)
    stage = None
    try:
        try:
            stage = _new_folder(out.parent, f".{out.name}.partial-")
        except PermissionError:  # a folder we may not write to around an existing out of ours: stage inside it
            if not out.is_dir():
                raise
            stage = _new_folder(out, ".partial-")
        yield stage
        _move_into_place(stage, out)
    except BaseException:
        if stage is not None:
            shutil.rmtree(stage, ignore_errors=True)
        for folder in reversed(made):
            try:
                folder.rmdir()
            except OSError:
                pass
        raise


def _new_folder(parent: Path, prefix: str) -> Path:
    """A new folder ``parent/<prefix><random>``, made by mkdir (so with the usual permissions, unlike mkdtemp)."""
    while True:
        folder = parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue


def _move_into_place(stage: Path, out: Path) -> None:
    """``stage`` becomes ``out``: renamed when ``out`` is missing or empty, else its files are moved in (the JSON
    last), and then the shards of the replaced split that the new JSON no longer lists are removed."""
    if stage.parent != out and not out.is_symlink() and (not out.exists() or not any(out.iterdir())):
        if out.exists():
            out.rmdir()
        stage.rename(out)
        return
    old_files = _listed_files(out) if is_latent_dir(out) else set()
    for path in sorted(stage.iterdir()):
        if path.name != INFO_FILE:
            os.replace(path, out / path.name)
    os.replace(stage / INFO_FILE, out / INFO_FILE)
    for name in old_files - _listed_files(out):
        (out / name).unlink(missing_ok=True)
    stage.rmdir()


def _listed_files(directory: Path) -> set[str]:
    """The shard files that ``latents.json`` of ``directory`` lists."""
    return {name for split in read_latent_info(directory)["splits"].values() for name in split["files"]}


def _captions(data: str, dataset: DFMDataset) -> list[str]:
    """One caption per image of the folder dataset, in its order."""
    samples = getattr(dataset, "samples", None)
    if not Path(data).is_dir() or samples is None:
        raise ValueError(f"--text-encoder needs an image folder with captions; --data {data} is not one")
    return read_captions(data, [path for path, _ in samples])


def _check_settings(batch_size: int, dtype: str) -> None:
    """Reject a batch size below 1 and a storage dtype we cannot write."""
    if batch_size < 1:
        raise ValueError(f"--batch-size {batch_size} must be at least 1")
    if dtype not in _DTYPES:
        raise ValueError(f"--dtype {dtype!r} is not supported; use one of {sorted(_DTYPES)}")


def _image_dataset(data: str, vae: VAE, resolution: int, split: str, upscale: bool, skip_bad: bool) -> DFMDataset:
    """The images to encode, unflipped; an error unless they are images with channels the VAE takes."""
    dataset_kwargs: dict[str, Any] = {}
    if is_latent_dir(Path(data)):
        raise ValueError(f"--data {data} is not an image dataset; pass a folder of images or 'fashion-mnist'")
    if Path(data).is_dir():  # errors about too small images name the flag of `dfm prepare`
        dataset_kwargs = {"upscale": upscale, "skip_bad": skip_bad, "upscale_flag": "--upscale"}
    # No flips: stored latents are of the images as they are. The split picks Fashion-MNIST's files.
    dataset = build_dataset(data, resolution=resolution, train=split != "test", random_flip=False, **dataset_kwargs)
    if dataset.needs_vae or dataset.is_video:
        raise ValueError(f"--data {data} is not an image dataset; pass a folder of images or 'fashion-mnist'")
    in_channels = int(vae.model.config.in_channels)
    if dataset.channels not in (1, in_channels):
        raise ValueError(
            f"--data {data} has {dataset.channels} channels but the VAE expects {in_channels}; "
            "convert the images or pick a matching VAE"
        )
    return dataset


def _kept_splits(
    out: Path,
    split: str,
    latent_shape: tuple[int, ...],
    vae: VAE,
    resolution: int,
    class_names: list[str],
    text: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The splits already in ``out`` other than ``split``; an error if they come from another VAE or data."""
    if not is_latent_dir(out):
        return {}
    old = read_latent_info(out)
    same = (
        old["latent_shape"] == list(latent_shape)
        and old["vae"] == vae.source
        and old.get("image_resolution") == resolution
        and old["class_names"] == class_names
        and old.get("text") == text
    )
    if not same:
        raise ValueError(
            f"--out {out} already holds latents of another VAE, resolution, class list or text encoder; choose a new "
            "--out directory"
        )
    return {name: s for name, s in old["splits"].items() if name != split}


def _encode(
    dataset: DFMDataset,
    vae: VAE,
    writer: LatentWriter,
    split: str,
    batch_size: int,
    num_workers: int,
    progress: bool,
    captions: list[str] | None = None,
    text_encoder: TextEncoder | None = None,
) -> None:
    """Encode every image of ``dataset`` in order into ``split`` of ``writer`` (grey repeated for an RGB VAE), and
    with ``captions`` each image's caption (once) by ``text_encoder``."""
    in_channels = int(vae.model.config.in_channels)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    done = 0
    with writer:
        for x, y in tqdm(loader, desc=f"encoding {split}", unit="batch", disable=not progress):
            if x.shape[1] == 1 and in_channels != 1:
                x = x.expand(-1, in_channels, -1, -1)
            mean, std = vae.encode(x)
            text = None
            if captions is not None:
                text = text_encoder(captions[done : done + x.shape[0]])
                y = torch.zeros_like(y)
            writer.add(split, mean, std, y, text)
            done += x.shape[0]


def add_prepare_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``prepare`` sub-command to an ``argparse`` sub-parser set; returns its parser."""
    parser = subparsers.add_parser(
        "prepare",
        help="encode an image dataset through a VAE into a latent directory",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    _add_arguments(parser)
    parser.set_defaults(func=run_prepare)
    return parser


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="image folder (class subfolders) or 'fashion-mnist'")
    parser.add_argument("--vae", required=True, help="AutoencoderKL folder (save_pretrained) or hub id")
    parser.add_argument("--out", required=True, help="output latent directory")
    parser.add_argument("--resolution", type=int, required=True, help="image size before encoding")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--split", default="train", help="name of the split to write (default: train)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shard-size", type=int, default=10_000, help="samples per safetensors file")
    parser.add_argument("--dtype", default="float32", choices=sorted(_DTYPES), help="storage dtype")
    parser.add_argument("--num-workers", type=int, default=0, help="image decoding worker processes")
    parser.add_argument("--upscale", action="store_true", help="allow images smaller than --resolution")
    parser.add_argument("--skip-bad", action="store_true", help="skip unreadable images with a warning")
    parser.add_argument("--text-encoder", help="a diffusers FLUX or SD3 directory: encode the images' captions "
                        "(captions.jsonl or one .txt per image) with its text encoders")  # fmt: skip
    parser.add_argument("--max-text-length", type=int, default=128,
                        help="T5 tokens kept per caption (default 128; 512 in bf16 is 4 MiB per image)")  # fmt: skip


def run_prepare(args: argparse.Namespace) -> int:
    """Handler of ``dfm prepare``; returns the process exit code."""
    out = prepare_latents(
        data=args.data,
        vae=args.vae,
        out=args.out,
        resolution=args.resolution,
        batch_size=args.batch_size,
        split=args.split,
        device=args.device,
        shard_size=args.shard_size,
        dtype=args.dtype,
        num_workers=args.num_workers,
        upscale=args.upscale,
        skip_bad=args.skip_bad,
        text_encoder=args.text_encoder,
        max_text_length=args.max_text_length,
    )
    info = read_latent_info(out)
    count = info["splits"][args.split]["num_samples"]
    print(f"wrote {count} latents of shape {tuple(info['latent_shape'])} to {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dfm.data.prepare", description=__doc__)
    _add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_prepare(args)
    except (ValueError, FileNotFoundError, ImportError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
