"""Timelines of profiled persistent runs: records, a per-worker Gantt chart, Chrome trace JSON."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from jax_ark._persistent._format import PROFILE_WORDS_PER_TASK, Plan


@dataclass
class Timeline:
    """records: one dict per task and rank with task, op, op_name, kind, rank, worker,
    wait_begin, start, end (ns, relative to the earliest wait_begin of the run). rank is 0 for a
    single profile; for a plan with put tasks, profiles of several ranks (stacked) share one
    clock (the CPU executor's), so their rows line up."""

    plan: Plan
    records: list[dict]

    def gantt(self, ax=None, title: str | None = None):
        """A Gantt chart (matplotlib) with one row per worker; returns the figure.

        Each task is one bar coloured by its op (legend: op index and name), with a thin outline so
        back-to-back tasks of one op stay countable; the grey band under a bar is the time its
        worker waited for the task's dependencies. Communication (put) tasks are drawn hatched in
        shades of red that no compute op uses; their bar includes the wait for the peers' tiles.
        With several ranks there is one row per (rank, worker). Without `ax` the figure is sized
        to its rows and legend and laid out so a plain `fig.savefig(path)` keeps every label.
        """
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch

        ranks = sorted({r.get("rank", 0) for r in self.records}) or [0]
        workers = [
            (k, w)
            for k in ranks
            for w in sorted(
                {r["worker"] for r in self.records if r.get("rank", 0) == k}
                | set(range(self.plan.num_workers))
            )
        ]
        row = {w: i for i, w in enumerate(workers)}
        ops = sorted({r["op"] for r in self.records})
        legend_cols = max(1, min(4, (len(ops) + 5) // 6))
        legend_rows = -(-len(ops) // legend_cols)
        own_figure = ax is None
        if own_figure:
            # Rows shrink for big worker counts (a GPU plan has one per SM) so the figure stays
            # a screen tall; the legend sits below the axes and gets its own height.
            row_in = 0.32 if len(workers) <= 16 else max(0.06, 7.0 / len(workers))
            height = 1.6 + row_in * len(workers) + 0.22 * legend_rows
            fig, ax = plt.subplots(figsize=(11, height), layout="constrained")
        else:
            fig = ax.figure
        comm_ops = [op for op in ops if self.plan.ops[op].kind == "put"]
        compute_ops = [op for op in ops if op not in comm_ops]
        cmap = plt.get_cmap("tab10" if len(compute_ops) <= 9 else "tab20")
        # Compute ops skip the palette's reds, which belong to communication.
        palette = [cmap(i) for i in range(cmap.N) if i not in ((3,) if cmap.N == 10 else (6, 7))]
        colour = {op: palette[i % len(palette)] for i, op in enumerate(compute_ops)}
        reds = plt.get_cmap("Reds")
        for i, op in enumerate(comm_ops):
            colour[op] = reds(0.45 + 0.45 * (i % 4) / 3)
        edge = 0.4 if len(self.records) <= 2000 else 0.0
        # One collection per (worker, op) and one of waits per worker: a plan can have thousands
        # of tasks, and a collection holds any number of rectangles (one per task).
        bars: dict[tuple[int, int], list[tuple[float, float]]] = {}
        waits: dict[int, list[tuple[float, float]]] = {}
        for r in self.records:
            span = (r["start"] / 1e3, max(r["end"] - r["start"], 1) / 1e3)
            key = (r.get("rank", 0), r["worker"])
            bars.setdefault((key, r["op"]), []).append(span)
            if r["start"] > r["wait_begin"]:
                wait = (r["wait_begin"] / 1e3, (r["start"] - r["wait_begin"]) / 1e3)
                waits.setdefault(key, []).append(wait)
        for w, spans in waits.items():
            coll = ax.broken_barh(spans, (row[w] - 0.4, 0.25), facecolors="0.75", linewidth=0)
            coll.set_gid("waits")
        for (w, op), spans in bars.items():
            coll = ax.broken_barh(
                spans,
                (row[w] - 0.15, 0.55),
                facecolors=colour[op],
                edgecolors="black",
                linewidth=edge,
                hatch="//" if op in comm_ops else None,
            )
            coll.set_gid("comm tasks" if op in comm_ops else "tasks")
        ax.set_ylim(len(workers) - 0.5, -0.5)  # worker 0 on top, as in trace viewers
        step = max(1, len(workers) // 24)
        several = len(ranks) > 1
        labels = [f"r{k} w{w}" if several else str(w) for k, w in workers[::step]]
        ax.set_yticks(range(0, len(workers), step), labels)
        ax.set_ylabel("rank, worker" if several else "worker")
        ax.set_xlabel("time since the first task began waiting (us)")
        ax.set_xlim(left=0)
        ax.grid(axis="x", alpha=0.3)
        waited = sum(r["start"] - r["wait_begin"] for r in self.records)
        busy = sum(r["end"] - r["start"] for r in self.records)
        ax.set_title(
            title
            or f"{len(self.records)} tasks of {len(ops)} ops on {len(workers)} workers"
            + (f" of {len(ranks)} ranks" if several else "")
            + f": busy {busy / 1e3:.0f} us, waiting for dependencies {waited / 1e3:.0f} us"
        )
        handles = [
            Patch(
                facecolor=colour[op],
                edgecolor="black",
                linewidth=0.4,
                hatch="//" if op in comm_ops else None,
                label=self._op_label(op)
                + (" (put: send + wait for peers)" if op in comm_ops else ""),
            )
            for op in ops
        ]
        handles.append(Patch(facecolor="0.75", label="waiting for dependencies"))
        if own_figure:
            fig.legend(handles=handles, loc="outside lower center", ncols=legend_cols, fontsize=8)
        else:
            ax.legend(handles=handles, fontsize=8)
        return fig

    def _op_label(self, op: int) -> str:
        count = sum(1 for r in self.records if r["op"] == op)
        o = self.plan.ops[op]
        return f"op {op} {o.kind} {o.name} ({count} task{'s' if count != 1 else ''})"

    def to_chrome_trace(self) -> dict:
        """Chrome / Perfetto trace-event JSON (open in ui.perfetto.dev or chrome://tracing)."""
        events = [
            {
                "name": r["op_name"],
                "cat": self.plan.ops[r["op"]].kind,
                "ph": "X",
                "ts": r["start"] / 1e3,
                "dur": (r["end"] - r["start"]) / 1e3,
                "pid": r.get("rank", 0),
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
    `persistent(fn, profile=True)` returns, `plan` the plan it ran (`persistent_fn.plan(*args)`).
    For a plan with put tasks, `profile` may hold the profiles of several ranks one after the
    other (`out_specs=P(axis)` of the profile inside jax.shard_map): one row per rank and worker.
    """
    raw = np.asarray(profile, dtype=np.int64).reshape(-1, PROFILE_WORDS_PER_TASK)
    n = len(plan.tasks)
    ranks = raw.shape[0] // n if n and raw.shape[0] % n == 0 else 0
    if raw.shape[0] != n and (plan.comm is None or ranks < 1):
        raise ValueError(f"profile has {raw.shape[0]} task records, the plan {n} tasks")
    origin = int(raw[:, 0].min()) if raw.size else 0
    records = []
    for i, (wait_begin, start, end, worker) in enumerate(raw.tolist()):
        t = i % n if n else i
        op = plan.tasks[t].op
        records.append(
            {
                "task": t,
                "op": op,
                "op_name": plan.ops[op].name,
                "kind": plan.ops[op].kind,
                "rank": i // n if n else 0,
                "worker": int(worker),
                "wait_begin": wait_begin - origin,
                "start": start - origin,
                "end": end - origin,
            }
        )
    return Timeline(plan, records)
