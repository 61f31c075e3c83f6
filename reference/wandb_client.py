"""The official W&B client (PyPI `wandb`) logging steps FIRST..LAST to run RUN_ID of
project PROJECT, resuming the run when it exists: the other side of
tests/wandb_interop.rs. Server and key come from WANDB_BASE_URL and WANDB_API_KEY.

    python reference/wandb_client.py PROJECT RUN_ID FIRST LAST [full]

With `full`, the client also sends system metrics (every 0.2 s) and its console, as a
user's script would by default: one printed line per step, `python client step N`.
"""
import sys
import time

import wandb


def main():
    project, run_id, first, last = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    full = len(sys.argv) > 5 and sys.argv[5] == "full"
    if full:
        settings = wandb.Settings(x_stats_sampling_interval=0.2, x_save_requirements=False, silent=True)
    else:
        settings = wandb.Settings(console="off", x_disable_stats=True, x_disable_meta=True, x_save_requirements=False,
                                  disable_code=True, disable_git=True, x_disable_machine_info=True, silent=True)
    run = wandb.init(project=project, id=run_id, resume="allow", settings=settings,
                     config={"from_python": True})
    for step in range(first, last + 1):
        run.log({"train/loss": 10.0 / step}, step=step)
        if full:
            print(f"python client step {step}", flush=True)
            time.sleep(0.3)
    run.finish()
    print(f"python client: run {run.id} steps {first}..{last} logged")


if __name__ == "__main__":
    main()
