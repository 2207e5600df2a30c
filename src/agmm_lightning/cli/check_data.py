"""``agmm check-data``: decode every file of the configured dataset and list those that fail."""

from __future__ import annotations

import sys

from agmm_lightning.cli.app import AGMMLightningCLI
from agmm_lightning.cli.messages import program
from agmm_lightning.data.checks import decode_all, read_headers
from agmm_lightning.data.files import FileDataModule
from agmm_lightning.errors import InputError

__all__ = ["check_data"]


class _DataOnlyCLI(AGMMLightningCLI):
    """Parses a full run configuration but builds only its datamodule (for ``check-data``)."""

    # Without a model, a normalisation "auto" need not be computed (it reads every image).
    data_links = ("num_classes", "in_channels")

    def instantiate_classes(self) -> None:
        """Instantiate the data alone: the model is not needed to check files."""
        config = self.config.clone()
        config.model = None
        try:
            self.datamodule = self.parser.instantiate_classes(config).get("data")
        except InputError as error:
            self.parser.error(str(error))


def check_data(args: list[str]) -> int:
    """``agmm check-data``: decode every file of the configured dataset, list those that fail.

    Args:
        args: The options after ``check-data``: the run's ``--config`` and any overrides.

    Returns:
        The exit status: 0 when every file decodes, 1 otherwise.
    """
    cli = _DataOnlyCLI(
        save_config_callback=None,
        seed_everything_default=False,
        run=False,
        args=args,
        parser_kwargs={"prog": f"{program()} check-data"},
    )
    data = cli.datamodule
    if not isinstance(data, FileDataModule):
        print(f"{type(data).__name__} makes its images: there are no files to check.")
        return 0
    problems, counts, seen = [], [], set()
    for split in ("train", "val", "test"):
        try:
            dataset = data.build_dataset(split)
        except InputError as error:
            problems.append(f"[{split}] {error}")
            continue
        images = tuple(record.image for record in dataset.records)
        if (dataset.mode, images) in seen:
            continue  # the test split is the validation split
        seen.add((dataset.mode, images))
        counts.append(f"{len(images)} {split}")
        found = read_headers(dataset, split, progress=False) + decode_all(dataset, split)
        problems += [f"[{split}] {problem}" for problem in dict.fromkeys(found)]
    checked = f"{', '.join(counts) or 'no'} images of {type(data).__name__} at {data.root}"
    if not problems:
        print(f"Checked {checked}: every file decodes.")
        return 0
    print(f"Checked {checked}: {len(problems)} problem(s).", file=sys.stderr)
    for problem in problems:
        print(f"  {problem}", file=sys.stderr)
    return 1
