"""`nemo-hf` as one rank of a distributed build, with the model's forwards counted (for the tests).

``NEMO_HF_TEST_COUNTS``: a folder where each rank writes ``counts-rank<R>.json`` at exit: how many
images and sentences went through its model. ``NEMO_HF_TEST_KILL=<rank>:<images>``: that rank kills
itself (SIGKILL, no clean-up) when it is about to embed past that many images: a rank dying mid-embedding.
"""

import atexit
import json
import os
import signal
import sys
from pathlib import Path

from transformers import CLIPModel

from nemo_hf.cli import main

RANK = int(os.environ.get("RANK", "0"))
counts = {"images": 0, "texts": 0}
kill_rank, _, kill_after = os.environ.get("NEMO_HF_TEST_KILL", "-1:0").partition(":")
image_features, text_features = CLIPModel.get_image_features, CLIPModel.get_text_features


def counted_image_features(self, pixel_values, **kwargs):
    if RANK == int(kill_rank) and counts["images"] + len(pixel_values) > int(kill_after):
        os.kill(os.getpid(), signal.SIGKILL)
    counts["images"] += len(pixel_values)
    return image_features(self, pixel_values=pixel_values, **kwargs)


def counted_text_features(self, input_ids, **kwargs):
    counts["texts"] += len(input_ids)
    return text_features(self, input_ids=input_ids, **kwargs)


CLIPModel.get_image_features, CLIPModel.get_text_features = counted_image_features, counted_text_features
if os.environ.get("NEMO_HF_TEST_COUNTS"):
    path = Path(os.environ["NEMO_HF_TEST_COUNTS"]) / f"counts-rank{RANK}.json"
    atexit.register(lambda: path.write_text(json.dumps(counts)))
sys.exit(main(sys.argv[1:]))
