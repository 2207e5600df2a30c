"""One-line messages made from jsonargparse's nested error texts (cli.messages)."""

import pytest
from jsonargparse import ArgumentError
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LightningArgumentParser

from agmm_lightning.cli.messages import concise_error, user_message
from agmm_lightning.errors import InputError


def parser_error(*args: str) -> str:
    """The raw message of LightningCLI's parser for ``args`` (a model in subclass mode)."""
    parser = LightningArgumentParser(exit_on_error=False)
    parser.add_lightning_class_args(LightningModule, "model", subclass_mode=True)
    with pytest.raises(ArgumentError) as error:
        parser.parse_args(["--model=agmm_lightning.AGMMSegmenter", *args])
    return str(error.value)


def test_an_unknown_option_is_named_with_the_closest_one():
    raw = parser_error("--model.init_args.mixture_cnt=2")
    assert "\n" in raw or len(raw) > 200, "jsonargparse's message is long"
    assert concise_error(raw) == (
        "--model.mixture_cnt: no such option of agmm_lightning.AGMMSegmenter "
        "(did you mean mixture_count?)"
    )


def test_a_value_of_the_wrong_type_names_the_key_and_the_value():
    message = concise_error(parser_error("--model.init_args.mixture_count=many"))
    assert message.startswith("--model") and "mixture_count" in message and "many" in message
    assert "\n" not in message


def test_lightnings_optimizer_options_point_to_the_models():
    message = concise_error("unrecognized arguments: --optimizer=Adam")
    assert "--model.init_args.optimizer" in message


def test_a_worker_traceback_is_reduced_to_the_error_itself():
    wrapped = InputError(
        "Caught InputError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
        "last):\n  File x\nagmm_lightning.errors.InputError: Image 'a' has no dense mask."
    )
    assert user_message(wrapped) == "Image 'a' has no dense mask."
