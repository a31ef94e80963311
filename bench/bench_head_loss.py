#!/usr/bin/env python
"""Peak memory of the LM-head loss (issue 20): transformers' path (head -> logits -> ForCausalLMLoss ->
backward) against the chunked loss that `prepare_model_for_training` installs for `model(labels=...)`
(qlora_ext.lm: full-vocabulary logits once, returned without a graph). SmolLM2-135M's head (576 -> 49152),
batch 4 x 256, float32; each side in its own process, peak RSS over 3 forward + backward passes (VmHWM reset
before each) minus RSS before it. Not a timing benchmark.

    python bench/bench_head_loss.py
"""
import subprocess
import sys

CHILD = r"""
import sys, torch
from qlora_ext import lm
from transformers.loss.loss_utils import ForCausalLMLoss
def rss(field):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith(field + ":")) >> 10
torch.manual_seed(0)
head = torch.nn.Linear(576, 49152, bias=False).requires_grad_(False)
h = torch.randn(4, 256, 576, requires_grad=True)
y = torch.randint(0, 49152, (4, 256))
peaks = []
for _ in range(3):
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    r0 = rss("VmRSS")
    if sys.argv[1] == "chunked":
        yy = torch.nn.functional.pad(y, (0, 1), value=-100)[..., 1:].reshape(-1)
        logits = torch.empty(h.shape[0] * h.shape[1], 49152)
        loss = lm._ChunkedHeadCrossEntropy.apply(h.reshape(-1, 576), head.weight, None, yy, logits, -100) / (yy != -100).sum()
    else:
        logits = head(h)
        loss = ForCausalLMLoss(logits, y, 49152)
    del logits
    loss.backward()
    peaks.append(rss("VmHWM") - r0)
print(max(peaks))
"""

if __name__ == "__main__":
    res = {side: int(subprocess.run([sys.executable, "-c", CHILD, side], capture_output=True, text=True,
                                    check=True).stdout.split()[-1]) for side in ("transformers", "chunked")}
    print(f"peak RSS over the head loss, forward + backward: transformers {res['transformers']} MiB, "
          f"chunked {res['chunked']} MiB ({res['chunked'] / res['transformers']:.2f}x); "
          f"logits [1024, 49152] float32 = {1024 * 49152 * 4 >> 20} MiB")
