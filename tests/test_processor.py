"""Our host-side processor (chat template, pads, tokenizer, image/video preprocessing) equals transformers'."""

import numpy as np
import pytest
from media import PROMPTS
from reference import hf_inputs

from mindvl.shapes.processor import Processor


@pytest.mark.parametrize("kind", PROMPTS)
def test_processor_equals_transformers(model_dir, kind):
    expected = hf_inputs(model_dir, **PROMPTS[kind])
    actual = Processor(model_dir)(**PROMPTS[kind])
    assert sorted(actual) == sorted(expected)
    for name in expected:
        assert actual[name].dtype == expected[name].dtype, name
        np.testing.assert_array_equal(actual[name], expected[name], err_msg=name)


def test_media_files_go_through_the_same_path(model_dir, tmp_path):
    image = PROMPTS["image"]["images"][0]
    image.save(tmp_path / "picture.png")
    from_file = Processor(model_dir)("Describe this image.", images=[tmp_path / "picture.png"])
    in_memory = Processor(model_dir)("Describe this image.", images=[image])
    for name in in_memory:
        np.testing.assert_array_equal(from_file[name], in_memory[name])
