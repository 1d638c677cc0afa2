"""The published Qwen2-VL-2B shapes (random weights, cut to 2 decoder layers and 2 vision blocks) load and run."""

import numpy as np
from media import sample_image

from mindvl.qwen2vl import load
from mindvl.shapes.image import ProcessorConfig, preprocess_images
from mindvl.testing.checkpoints import write_checkpoint


def test_2b_shapes_one_graph_forward(tmp_path):
    model_dir = write_checkpoint(tmp_path / "2b", "2b-shapes", num_hidden_layers=2, vision_depth=2)
    model = load(model_dir)
    cfg = model.cfg
    assert (cfg.text.hidden_size, cfg.text.vocab_size, cfg.vision.embed_dim) == (1536, 151936, 1280)
    assert cfg.text.tie_word_embeddings and cfg.text.num_hidden_layers == 2

    pixel_values, grid = preprocess_images([sample_image(112, 84, seed=0)], ProcessorConfig.from_dir(model_dir))
    n_image_tokens = int(grid.prod()) // 4
    input_ids = np.array([[151644, 872, 198, cfg.vision_start_token_id] + [cfg.image_token_id] * n_image_tokens
                          + [cfg.vision_end_token_id, 3838, 374, 419, 30, 151645, 198]])
    logits = model.logits(input_ids, pixel_values, grid, mode="graph")
    assert logits.shape == (1, input_ids.shape[1], 151936)
    assert np.isfinite(logits).all() and logits.std() > 0
