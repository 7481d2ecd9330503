"""Write tests/data/mmengine_runner_tiny.pth (and its weights alone, ..._weights.pt): a checkpoint
as mmengine's Runner.save_checkpoint writes it.

Run in the official environment (mmengine installed; see tests/data/README.md):

    /path/to/official-venv/bin/python tests/golden/make_mmengine_checkpoint.py

The file holds what official Rein training checkpoints hold besides the weights: ``meta`` (with the
config text and dataset meta), the ``message_hub`` state (mmengine ``HistoryBuffer`` objects and
numpy values), the optimizer state and the parameter schedulers. reinseg must read its weights
without importing mmengine or running anything in the file (tests/test_safe_load.py).
"""

import sys
import time
from pathlib import Path

import numpy as np
import torch
from mmengine.config import Config
from mmengine.logging import MessageHub
from mmengine.optim.scheduler import PolyLR
from mmengine.runner.checkpoint import save_checkpoint, weights_to_cpu

out = Path(__file__).resolve().parents[1] / "data" / "mmengine_runner_tiny.pth"
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
scheduler = PolyLR(optimizer, eta_min=0, power=0.9, begin=0, end=40000, by_epoch=False)
for _ in range(2):
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    scheduler.step()

hub = MessageHub.get_instance("reinseg-golden")
for step in range(3):
    hub.update_scalar("train/loss", float(np.float32(1.5 - 0.1 * step)))
    hub.update_scalar("train/lr", np.float64(1e-4))
hub.update_info("iter", 2)
hub.update_info("seed", np.int64(0))
cfg = Config(dict(model=dict(type="EncoderDecoder"), crop_size=(512, 512)))
meta = dict(
    epoch=0,
    iter=2,
    cfg=cfg.pretty_text,
    seed=0,
    experiment_name="golden",
    time=time.strftime("%Y%m%d_%H%M%S", time.gmtime(0)),
    mmengine_version="golden",
    dataset_meta=dict(classes=("road", "sidewalk", "building"), palette=[[128, 64, 128], [244, 35, 232], [70, 70, 70]]),
    cfg_object=cfg._cfg_dict,  # a ConfigDict, as some mmengine hooks store
)
checkpoint = dict(
    meta=meta,
    state_dict=weights_to_cpu(model.state_dict()),
    message_hub=hub.state_dict(),
    optimizer=optimizer.state_dict(),
    param_schedulers=[scheduler.state_dict()],
)
save_checkpoint(checkpoint, str(out))
# The weights alone, as plain tensors: what reading the checkpoint must give.
torch.save(dict(model.state_dict()), out.with_name("mmengine_runner_tiny_weights.pt"))
print(f"wrote {out} ({out.stat().st_size} bytes) with", sys.version.split()[0])
