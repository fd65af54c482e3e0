"""Runs sd-scripts' train_network.py in this process, exactly as its __main__ does. On the tiny
fixture checkpoint sd-scripts' SD1 loader needs its widths: its SD1.5 widths are hard-coded, so
they are first set from sd15-tiny/arch.json (the same patch the sd_scripts_runs golden generator
applies). A full-size checkpoint (LORAKIT_FULL_SIZE=1) runs unpatched.

    SD_PYTHON bench/sd_scripts_train.py SD_SCRIPTS_CHECKOUT [train_network.py arguments...]

TORCH_THREADS (default 1) sets torch's intra-op threads. Prints the training seconds (from
NetworkTrainer.train's start to its end) on the last line.
"""

import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "..", "tests", "fixtures")
sys.path.insert(0, os.path.join(FIXTURES, "generate"))


def main():
    sd_scripts, argv = os.path.abspath(sys.argv[1]), sys.argv[2:]
    sys.path.insert(0, sd_scripts)
    os.chdir(sd_scripts)
    import torch

    torch.set_num_threads(int(os.environ.get("TORCH_THREADS", "1")))
    from sd_scripts_runs import patch_tiny_model

    if os.environ.get("LORAKIT_FULL_SIZE") != "1":
        with open(os.path.join(FIXTURES, "sd15-tiny", "arch.json"), encoding="utf-8") as f:
            patch_tiny_model(json.load(f))
    import train_network
    from library import train_util

    parser = train_network.setup_parser()
    args = parser.parse_args(argv)
    train_util.verify_command_line_training_args(args)
    args = train_util.read_config_from_file(args, parser)
    began = time.perf_counter()
    train_network.NetworkTrainer().train(args)
    print(f"train seconds {time.perf_counter() - began:.2f}")


if __name__ == "__main__":
    main()
