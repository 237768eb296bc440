"""Running in this process as the Ray driver: on a local cluster started here, or on ``--address``.

After ``fit``: ``metrics.csv`` and ``metrics.png`` from the run's metrics, the consolidated export (when the run
finished), and a summary table. The local cluster is stopped at exit unless ``--keep-cluster``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["connect", "finish_run", "run_on_ray"]


def connect(args: argparse.Namespace, recipe: Any, console: Any) -> tuple[Any, str | None]:
    """Start the local cluster (unless ``--address``) and ``ray.init`` to it. Returns (local cluster, dashboard)."""
    from encdec.launcher.ray.ray_auth import auth_env, dashboard_line

    auth_env()  # before `import ray`: Ray reads RAY_AUTH_MODE when it loads
    if not sys.stderr.isatty():  # worker lines Ray prints here: no colour codes around their prefix in a log
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    import ray

    from encdec.launcher.ray.ray_cluster import STATE_TRACKING_ENV, LocalRayCluster

    # The Train state callback is created by the driver's trainer: the driver needs the flag too, not only the
    # cluster (this is what makes the dashboard's Train view list the run).
    os.environ.update(STATE_TRACKING_ENV)
    cluster = None
    address = args.address
    dashboard = None
    if not address:
        nodes = args.simulate_nodes or 1
        t0 = time.perf_counter()
        console.print(f"starting a local Ray cluster ({nodes} node{'s' if nodes > 1 else ''})...")
        cluster = LocalRayCluster(temp_dir=args.ray_temp_dir, num_nodes=nodes, dashboard_port=args.dashboard_port)
        try:
            cluster.start()
        except BaseException:  # Ctrl-C while the nodes come up: leave nothing running
            cluster.stop()
            raise
        address, dashboard = cluster.gcs_address, cluster.dashboard_url
        console.print(f"Ray cluster up in {time.perf_counter() - t0:.0f} s; {dashboard_line(dashboard)}")
    try:
        ctx = ray.init(address=address, runtime_env=recipe.cluster.runtime_env or None,
                       log_to_driver=bool(args.no_progress), logging_level=logging.WARNING,
                       configure_logging=True)
    except BaseException:
        if cluster is not None:
            cluster.stop()
        raise
    url = getattr(ctx, "dashboard_url", None)
    if dashboard is None and url:
        dashboard = url if url.startswith("http") else f"http://{url}"
        console.print(dashboard_line(dashboard))
    return cluster, dashboard


def run_on_ray(recipe: Any, make_run_dir: Callable[[], Path], plan: Any, args: argparse.Namespace,
               console: Any) -> int:
    """Connect, check capacity, make the run directory, check shared storage, fit with a progress bar, then
    finish the run's outputs."""
    cluster, dashboard = connect(args, recipe, console)
    import ray

    from encdec.launcher.ray.driver import check_capacity, check_shared_storage, fit
    from encdec.launcher.report import Progress, RunLog, error_reason
    from encdec.launcher.rundir import update_launch, write_status

    outcome = None
    run_dir: Path | None = None
    tracker = None
    runlog: RunLog | None = None
    try:
        check_capacity(recipe)
        run_dir = make_run_dir()
        runlog = RunLog(run_dir)
        write_status(run_dir, "running", f"{recipe.cluster.world_size} workers, {recipe.train.max_steps} steps")
        runlog.line(f"run {run_dir.name}: {recipe.cluster.world_size} workers on {recipe.cluster.nodes} node(s), "
                    f"{recipe.train.max_steps} steps")
        check_shared_storage(run_dir, recipe.cluster.nodes)
        update_launch(run_dir, dashboard=dashboard, ray_address=ray.get_runtime_context().gcs_address,
                      driver_pid=os.getpid())
        total = recipe.train.max_steps
        from encdec.track import open_tracker  # issue 16 hook: the driver feeds rank 0's reports to tracking

        tracker = open_tracker(recipe.track, run_dir, recipe.to_yaml_dict(),
                               on_problem=lambda m: console.print(f"[yellow]{m}[/yellow]"))
        with Progress(total, enabled=not args.no_progress) as progress:
            def on_metrics(m: dict[str, Any]) -> None:
                progress.update(m)
                runlog.line(progress.line())  # type: ignore[union-attr]
                if tracker is not None:
                    tracker.log(m)

            def on_stop() -> None:
                msg = "stop requested: the workers checkpoint and return (Ctrl-C again to abort)"
                progress.message(msg)
                runlog.line(msg)  # type: ignore[union-attr]

            outcome = fit(recipe, run_dir, on_metrics=on_metrics, on_stop_requested=on_stop)
    except KeyboardInterrupt:
        console.print("aborted (second Ctrl-C): no checkpoint was written for the current step")
        if run_dir is not None:
            write_status(run_dir, "stopped", "aborted by a second Ctrl-C: no checkpoint for the current step")
        if tracker is not None:
            tracker.finish("failed")
        if runlog is not None:
            runlog.close()
        return 130
    except BaseException as err:  # recorded, then raised as before (the CLI prints it)
        if run_dir is not None:
            reason, full = error_reason(err)
            write_status(run_dir, "failed", reason, error=full)
            if runlog is not None:
                runlog.line(f"the run failed: {full}", logging.ERROR)
                runlog.close()
        raise
    finally:
        if run_dir is not None:
            # In a Ray Job the working directory is the job's runtime_env copy, which Ray deletes once this driver
            # disconnects; the export and the plots must not depend on it.
            os.chdir(run_dir)
        ray.shutdown()
        if cluster is not None:
            if args.keep_cluster and run_dir is not None:
                info = cluster.info()
                (run_dir / "cluster.json").write_text(json.dumps(info, indent=2) + "\n")
                groups = " ".join(f"-{pid}" for pid in info["pids"])
                console.print(f"keeping the Ray cluster: --address {info['gcs_address']}, dashboard "
                              f"{info['dashboard_url']} (recorded in {run_dir / 'cluster.json'}); stop it with "
                              f"`kill -TERM -- {groups}`, then `kill -KILL -- {groups}` after a few seconds")
            else:
                cluster.stop()
    assert run_dir is not None  # set before fit, and fit ran (errors before it raised)
    try:
        return finish_run(recipe, run_dir, outcome, console, tracker=tracker, runlog=runlog)
    finally:
        if runlog is not None:
            runlog.close()


def finish_run(recipe: Any, run_dir: Path, outcome: Any, console: Any, tracker: Any = None,
               runlog: Any = None) -> int:
    """metrics.csv, the plot, the export, ``status.json`` and the summary. Returns the exit status."""
    from encdec.launcher.report import (
        end_of_run,
        metric_rows,
        plot_metrics,
        skipped_tiles,
        summary_table,
        write_metrics_csv,
    )
    from encdec.launcher.rundir import latest_checkpoint, write_status

    rows = metric_rows(run_dir / "metrics.jsonl")
    csv_path = write_metrics_csv(rows, run_dir / "metrics.csv") if rows else None
    png = plot_metrics(rows, run_dir / "metrics.png", title=run_dir.name) if rows else None
    last = rows[-1] if rows else {}
    ckpt = latest_checkpoint(run_dir)
    export_path = None
    failed = outcome is not None and outcome.error is not None
    early = last.get("status") == "early-stopped"  # issue 16: train.early_stop ended the run (it checkpointed)
    done = not failed and not outcome.stopped and (early or int(last.get("step", 0)) >= (recipe.train.max_steps or 0))
    if done and recipe.run.export:
        from encdec.launcher.commands.export_cmd import export_run

        try:
            export_path = export_run(run_dir)
        except Exception as err:  # the run itself succeeded; say why the export did not
            console.print(f"[yellow]export failed[/yellow]: {type(err).__name__}: {err}; retry with "
                          f"`encdec-launch export {run_dir}`")
    skips, first_skips = skipped_tiles(run_dir / "skipped_tiles.csv")
    skipped_text = (f"{sum(skips.values())}: " + ", ".join(f"{r} {n}" for r, n in sorted(skips.items()))
                    + " (skipped_tiles.csv)") if skips else "0"
    best = [float(r["val/mIoU"]) for r in rows if isinstance(r.get("val/mIoU"), (int, float))]
    peak = [f.get("mem/peak_rss_gb") for f in (outcome.finals.values() if outcome else [])]
    summary = [
        ("run directory", str(run_dir)),
        ("status", "failed" if failed else "stopped (checkpoint saved)" if outcome and outcome.stopped else
         "early-stopped" if early else "finished"),
        ("steps", f"{last.get('step', 0)} / {recipe.train.max_steps or '-'}"),
        ("train loss", _num(last.get("train/loss"))),
    ]
    if best:
        summary += [("val mIoU (last / best)", f"{best[-1]:.4f} / {max(best):.4f}")]
    for key in ("val/accuracy", "val/rmse"):
        if key in last:
            summary.append((key, _num(last[key])))
    summary += [
        ("tiles/s (last window)", _num(last.get("train/tiles_per_s"), ".1f")),
        ("wall time", f"{outcome.seconds:.0f} s" if outcome else "-"),
        ("peak RSS per worker", ", ".join(f"{p:.2f} GiB" for p in peak if p) or "-"),
        ("checkpoint", str(ckpt) if ckpt else "-"),
        ("skipped tiles", skipped_text),
        ("metrics", f"{csv_path or '-'}  plot: {png or '-'}"),
        ("exported model", str(export_path) if export_path else "-"),
    ]
    if tracker is not None:  # issue 16 hook: end-of-run files and status to the tracking backends
        status = ("failed" if failed else "stopped" if outcome is not None and outcome.stopped else
                  "early-stopped" if early else "finished")
        tracker.finish(status, {"plot": png, "metrics_csv": csv_path,
                                 "model": export_path.parent if export_path else None})
        summary.append(("tracking", ", ".join(s.name for s in tracker.sinks) + (
            f" ({len(tracker.problems)} problem(s), printed above)" if tracker.problems else "")))
    state, reason, details = end_of_run(failed=outcome.error if failed else None, stopped=bool(outcome and outcome.stopped),
                                        rows=rows, max_steps=recipe.train.max_steps, skips=skips,
                                        early_stop=recipe.train.early_stop)
    write_status(run_dir, state, reason, **details)
    if runlog is not None:
        for key, value in summary:
            runlog.line(f"summary: {key}: {value}")
        runlog.line(f"{state}: {reason}" + (f"\n{details['error']}" if "error" in details else ""),
                    logging.ERROR if state == "failed" else logging.INFO)
    from encdec.launcher.report import SUMMARY_WIDTH

    console.print(summary_table("summary", summary), width=None if console.is_terminal else SUMMARY_WIDTH)
    if first_skips:
        console.print(f"[yellow]skipped tiles[/yellow], first: {'; '.join(first_skips)}; all in "
                      f"{run_dir / 'skipped_tiles.csv'}", highlight=False)
    if outcome is not None and outcome.stopped:
        console.print(f"continue with: encdec-launch --resume {run_dir}")
    if failed:
        console.print(f"[red]the run failed[/red]: {type(outcome.error).__name__}: {outcome.error}")
        return 1
    return 0


def _num(value: Any, spec: str = ".4f") -> str:
    return format(value, spec) if isinstance(value, (int, float)) else "-"
