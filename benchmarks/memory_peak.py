"""What holds the memory at the peak of a training step: the tensors alive at that instant, by where they were made.

torch.profiler with profile_memory records every allocation and free of the step with its address, its
size and the allocator's running total ("Total Allocated"). The peak is the largest total; a tensor is alive
there if it was allocated before and freed after (or never, within the step). Each is charged to the
operation that made it:
  forward    the outermost aten op that contains the allocation (aten::linear, aten::scaled_dot_product_...)
  backward   the autograd node being evaluated (MmBackward0, ...; a checkpointed block's recompute counts here)
  optimizer  the optimizer's step
  other      anything else (the loss's Python code outside an op, ...)
Tensors alive before the step began (weights, optimizer state, the batch) are not in it: the profiler's
total counts from its start. Memory the C library holds beyond the tensors (freed blocks it
has not returned, fragmentation) is not seen here; the caller compares with RSS.
"""

import json
import os
import tempfile
from collections import defaultdict


def _phase_and_op(stack: list[dict]) -> tuple[str, str]:
    names = [e["name"] for e in stack]
    for name in names:
        if name.startswith("autograd::engine::evaluate_function: "):
            return "backward", name.split(": ", 1)[1]
        if name.startswith("Optimizer.step"):
            return "optimizer", name
    aten = next((n for n in names if n.startswith("aten::")), None)
    return ("forward", aten) if aten else ("other", names[-1] if names else "(no op)")


def live_at_peak(step, top: int = 12) -> dict:
    """Run step() once under the profiler; returns {"peak_mb": the most the step's tensors held at once,
    "groups": [(phase, op, MB), ...] the `top` largest groups of the tensors
    made by the step and alive at the peak, "rest_mb": the other groups'}. The groups can sum to more than
    peak_mb when the step frees tensors it did not make (the last step's gradients)."""
    import torch

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    finally:
        os.unlink(path)
    memory = sorted((e for e in events if e.get("name") == "[memory]" and e["args"].get("Device Type", 0) == 0),
                    key=lambda e: e["ts"])
    ops = sorted((e for e in events if e.get("ph") == "X" and e.get("cat") in ("cpu_op", "user_annotation")),
                 key=lambda e: (e["ts"], -e["dur"]))
    if not memory:
        return {"peak_mb": 0.0, "groups": [], "rest_mb": 0.0}
    end = max(range(len(memory)), key=lambda k: memory[k]["args"]["Total Allocated"])  # the peak's event
    # each allocation's maker: walk ops and allocations in time order, keeping each thread's stack of open
    # ops; an allocation of the step that is not freed by the peak is alive there
    stacks, i, alive = defaultdict(list), 0, {}
    for m in memory[:end + 1]:
        while i < len(ops) and ops[i]["ts"] <= m["ts"]:
            stack = stacks[ops[i]["tid"]]
            while stack and stack[-1]["ts"] + stack[-1]["dur"] < ops[i]["ts"]:
                stack.pop()
            stack.append(ops[i])
            i += 1
        stack = stacks[m["tid"]]
        while stack and stack[-1]["ts"] + stack[-1]["dur"] < m["ts"]:
            stack.pop()
        if m["args"]["Bytes"] > 0:
            alive[m["args"]["Addr"]] = (m["args"]["Bytes"], _phase_and_op(stack))
        else:
            alive.pop(m["args"]["Addr"], None)  # (a tensor from before the step is not in `alive`)
    groups = defaultdict(int)
    for nbytes, key in alive.values():
        groups[key] += nbytes
    ranked = sorted(groups.items(), key=lambda kv: -kv[1])
    mb = 2 ** 20
    return {"peak_mb": memory[end]["args"]["Total Allocated"] / mb,
            "groups": [(phase, op, n / mb) for (phase, op), n in ranked[:top]],
            "rest_mb": sum(n for _, n in ranked[top:]) / mb}
