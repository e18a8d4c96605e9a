"""The Gantt chart and plan summary are readable: one bar per task, a legend, nothing cut off."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np

import jax_ark as ark

matplotlib.use("Agg")


def _block(x, w1, w2):
    return x + jax.nn.gelu(x @ w1) @ w2


def _args(rng):
    return (
        jnp.asarray(rng.standard_normal((8, 64)), jnp.float32),
        jnp.asarray(rng.standard_normal((64, 128)) / 8, jnp.float32),
        jnp.asarray(rng.standard_normal((128, 64)) / 11, jnp.float32),
    )


def test_gantt_has_a_bar_per_task_a_legend_and_fits(tmp_path):
    import matplotlib.pyplot as plt

    args = _args(np.random.default_rng(3))
    profiled = ark.persistent(_block, profile=True, num_workers=2, tile_n=16)
    out, profile = jax.jit(profiled)(*args)
    np.testing.assert_allclose(out, jax.jit(_block)(*args), rtol=1e-4, atol=1e-4)
    plan = profiled.plan(*args)
    tl = ark.timeline(profile, plan)
    fig = tl.gantt()
    ax = fig.axes[0]

    # Back-to-back tasks of one op are separate bars, not one merged span.
    def rectangles(gid: str) -> int:
        return sum(len(c.get_paths()) for c in ax.collections if c.get_gid() == gid)

    assert rectangles("tasks") == len(plan.tasks)
    assert all(c.get_linewidth()[0] > 0 for c in ax.collections if c.get_gid() == "tasks")
    assert rectangles("waits") == sum(r["start"] > r["wait_begin"] for r in tl.records)
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    for i, op in enumerate(plan.ops):
        count = sum(1 for t in plan.tasks if t.op == i)
        assert any(
            label.startswith(f"op {i} {op.kind} {op.name} ({count} task") for label in labels
        )
    assert "waiting for dependencies" in labels
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0", "1"]
    # A plain savefig keeps every label: the drawn extent lies inside the figure.
    fig.savefig(tmp_path / "gantt.png")
    renderer = fig.canvas.get_renderer()
    drawn, page = fig.get_tightbbox(renderer), fig.bbox_inches
    assert drawn.x0 >= page.x0 - 1e-3 and drawn.y0 >= page.y0 - 1e-3, (drawn, page)
    assert drawn.x1 <= page.x1 + 1e-3 and drawn.y1 <= page.y1 + 1e-3, (drawn, page)
    plt.close(fig)


def test_summary_of_many_workers_is_short():
    s = jax.ShapeDtypeStruct
    plan = ark.plan(
        _block,
        s((8, 1024), jnp.bfloat16),
        s((1024, 4096), jnp.bfloat16),
        s((4096, 1024), jnp.bfloat16),
        platform="gpu",
        num_workers=132,
    )
    text = plan.summary()
    assert len(text.splitlines()) < 12, text
    counts = [len(q) for q in plan.queues]
    assert (
        f"workers: 132, tasks per worker min {min(counts)} / median "
        f"{float(np.median(counts)):g} / max {max(counts)}"
    ) in text
    few = ark.plan(_block, *_args(np.random.default_rng(0)), num_workers=3)
    assert [line for line in few.summary().splitlines() if line.startswith("  worker ")] == [
        f"  worker {w}: {len(q)} tasks" for w, q in enumerate(few.queues)
    ]
