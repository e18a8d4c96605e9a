"""Timelines of profiled persistent runs: records, a per-worker Gantt chart, Chrome trace JSON."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from jax_ark._persistent._format import PROFILE_WORDS_PER_TASK, Plan


@dataclass
class Timeline:
    """records: one dict per task with task, op, op_name, worker, wait_begin, start, end (ns,
    relative to the earliest wait_begin of the run)."""

    plan: Plan
    records: list[dict]

    def gantt(self, ax=None, title: str | None = None):
        """A per-worker Gantt chart (matplotlib); returns the figure."""
        import matplotlib.pyplot as plt

        if ax is None:
            fig, ax = plt.subplots(figsize=(12, 1 + 0.4 * self.plan.num_workers))
        else:
            fig = ax.figure
        cmap = plt.get_cmap("tab20")
        for r in self.records:
            ax.broken_barh(
                [(r["start"] / 1e3, max(r["end"] - r["start"], 1) / 1e3)],
                (r["worker"] - 0.4, 0.8),
                facecolors=cmap(r["op"] % 20),
            )
        ax.set_xlabel("time (us)")
        ax.set_ylabel("worker")
        ax.set_yticks(range(self.plan.num_workers))
        ax.set_title(title or f"{len(self.records)} tasks on {self.plan.num_workers} workers")
        return fig

    def to_chrome_trace(self) -> dict:
        """Chrome / Perfetto trace-event JSON (open in ui.perfetto.dev or chrome://tracing)."""
        events = [
            {
                "name": r["op_name"],
                "cat": self.plan.ops[r["op"]].kind,
                "ph": "X",
                "ts": r["start"] / 1e3,
                "dur": (r["end"] - r["start"]) / 1e3,
                "pid": 0,
                "tid": r["worker"],
                "args": {
                    "task": r["task"],
                    "op": r["op"],
                    "wait_us": (r["start"] - r["wait_begin"]) / 1e3,
                },
            }
            for r in self.records
        ]
        return {"traceEvents": events, "displayTimeUnit": "ns"}

    def save_chrome_trace(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_chrome_trace(), f)


def timeline(profile, plan: Plan) -> Timeline:
    """Builds the timeline of one profiled run: `profile` is the int64[num_tasks * 4] array that
    `persistent(fn, profile=True)` returns, `plan` the plan it ran (`persistent_fn.plan(*args)`)."""
    raw = np.asarray(profile, dtype=np.int64).reshape(-1, PROFILE_WORDS_PER_TASK)
    if raw.shape[0] != len(plan.tasks):
        raise ValueError(
            f"profile has {raw.shape[0]} task records, the plan {len(plan.tasks)} tasks"
        )
    origin = int(raw[:, 0].min()) if raw.size else 0
    records = []
    for t, (wait_begin, start, end, worker) in enumerate(raw.tolist()):
        op = plan.tasks[t].op
        records.append(
            {
                "task": t,
                "op": op,
                "op_name": plan.ops[op].name,
                "worker": int(worker),
                "wait_begin": wait_begin - origin,
                "start": start - origin,
                "end": end - origin,
            }
        )
    return Timeline(plan, records)
