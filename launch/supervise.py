"""Runs a job again when it fails: the restart loop of the launchers' --max_restarts=N.

usage: python3 launch/supervise.py --max_restarts=N --workdir=DIR [--name=NAME]
                                   [--restart_delay=SECONDS] -- JOB...

JOB is a command that runs every process of the job and returns when the job ends, having
stopped every process once one of them failed (launch/local.sh, `srun --kill-on-bad-exit=1`;
on a pod, one worker's jaxlm process: below). When it exits nonzero, it is started again -
the run resumes from the best checkpoint tier by itself (jaxlm/tiers.py) - at most N times. A
job that fails twice in a row at the same step (the last training step in DIR/metrics.jsonl)
is not started again: it is failing at that step, not being preempted, and the reason is in
its log; nor is one that stopped on bad input (exit status 2). In a gs:// workdir the rows go
out every 30 s and at each start's first step, so there "the same step" means: two starts
from the same step that each failed within 30 s of it.
Each start gets JAXLM_RESTART=<restarts so far> in its environment. SIGTERM is passed on to
the job and ends the loop: a stop asked for is never followed by a restart.

On a TPU pod (launch/tpu_pod.sh --max_restarts) no one process sees every worker: each worker
runs its own supervisor around its own jaxlm process. When one process dies, JAX's
coordination service ends the others within distributed.heartbeat_timeout_s; each supervisor
then waits --restart_delay (about that bound, so that no process of the new start meets one of
the old) and starts its process again, and they join up again. All the supervisors read the
same DIR/metrics.jsonl, so they reach the same decision to restart or to give up.
"""

import argparse
import os
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def progress(workdir):
  """The last training step logged in the workdir, or None where it cannot be read (a gs://
  workdir on a machine without jaxlm's dependencies)."""
  sys.path.insert(0, ROOT)
  try:
    from jaxlm import goodput, workdir as workdir_lib
    return goodput.last_logged_step(workdir_lib.metrics_path(workdir))
  except Exception:  # noqa: BLE001 - no progress known: only max_restarts bounds the restarts.
    return None


def parse(argv):
  parser = argparse.ArgumentParser(prog='launch/supervise.py', usage=__doc__.split('\n')[2])
  parser.add_argument('--max_restarts', type=int, required=True)
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--name', default='launch/supervise.py')
  parser.add_argument('--restart_delay', type=float, default=0.0)
  parser.add_argument('job', nargs=argparse.REMAINDER)
  args = parser.parse_args(argv)
  if args.job[:1] == ['--']:
    args.job = args.job[1:]
  if args.max_restarts < 0:
    fail(args.name, f'--max_restarts={args.max_restarts} must be >= 0')
  if args.restart_delay < 0:
    fail(args.name, f'--restart_delay={args.restart_delay:g} must be >= 0')
  if not args.job:
    fail(args.name, "missing '-- JOB...': the command that runs the job")
  return args


def fail(name, message):
  print(f'{name}: error: {message}', file=sys.stderr)
  sys.exit(2)


def main(argv):
  args = parse(argv)
  job = None
  stopped = []

  def forward(signum, frame):  # A scheduler's SIGTERM is the job's: it saves and stops.
    stopped.append(signum)
    if job is not None and job.poll() is None:
      job.send_signal(signum)

  for signum in (signal.SIGTERM, signal.SIGINT):
    signal.signal(signum, forward)
  failed_at = None
  for restart in range(args.max_restarts + 1):
    began = time.time()
    job = subprocess.Popen(args.job, env=dict(os.environ, JAXLM_RESTART=str(restart)))
    code = job.wait()
    if code == 0 or stopped or code in (-signal.SIGTERM, 128 + signal.SIGTERM):
      return code if code >= 0 else 128 - code  # Done, or stopped on purpose.
    if code == 2:  # Bad input (jaxlm's exit status for it) does not mend itself.
      print(f'{args.name}: the job stopped on its input (exit status 2); not restarting it',
            file=sys.stderr)
      return code
    step = progress(args.workdir)
    if step is not None and step == failed_at:
      print(f'{args.name}: the job failed twice at step {step} (exit status {code}); not '
            f'restarting it: the log above says why', file=sys.stderr)
      return code
    failed_at = step
    if restart == args.max_restarts:
      print(f'{args.name}: the job failed (exit status {code}) after {restart} restart(s), '
            f'--max_restarts={args.max_restarts}; not restarting it', file=sys.stderr)
      return code
    delay = f' in {args.restart_delay:g} s' if args.restart_delay else ''
    print(f'{args.name}: the job failed (exit status {code}, last logged step '
          f'{"unknown" if step is None else step}, {time.time() - began:.0f} s after it '
          f'started); restart {restart + 1} of {args.max_restarts}{delay}', file=sys.stderr)
    resume_at = time.monotonic() + args.restart_delay
    while not stopped and (left := resume_at - time.monotonic()) > 0:
      time.sleep(min(1.0, left))  # Short naps: a SIGTERM ends the wait.
    if stopped:
      return code
  return 1


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
