"""Train the runs of a JSON file (a list of TrainConfig dicts) one after the other, every torchrun process taking
part in each (tests/test_distributed.py runs this under ``torchrun --standalone``). Rank 0 writes each run's
``costs.json`` (TrainResult.costs)."""

import json
import sys
from pathlib import Path

from onelayer.config import TrainConfig, from_dict
from onelayer.training import train
from onelayer.training.distributed import torchrun_world


def main() -> None:
    for data in json.loads(Path(sys.argv[1]).read_text()):
        config = from_dict(TrainConfig, data)
        world = torchrun_world(config.device)
        result = train(config, progress=False, world=world)
        if world.is_main:
            (Path(config.out) / "costs.json").write_text(json.dumps(result.costs))


if __name__ == "__main__":
    main()
