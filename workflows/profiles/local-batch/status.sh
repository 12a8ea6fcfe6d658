#!/bin/sh
# status.sh JOBID: "running", "success" or "failed", one line: the job status of the local-batch
# stand-in (submit.sh) for Snakemake's cluster-generic executor (--cluster-generic-status-cmd).
# A job is running while its process lives (or before it has started), has succeeded when its
# exit code is 0 and failed otherwise, also when it ended without one (cancelled, killed).
spool=${LOCAL_BATCH_SPOOL:-.snakemake/local-batch}
dir=$spool/$1
finished() {
    if [ -f "$dir/exit_code" ]; then
        if [ "$(cat "$dir/exit_code")" = 0 ]; then echo success; else echo failed; fi
        exit 0
    fi
}
if [ -z "$1" ] || [ ! -f "$dir/request" ]; then
    echo "status.sh: no job '$1' in $spool" >&2
    exit 1
fi
finished
if [ ! -f "$dir/pid" ] || kill -0 "$(cat "$dir/pid")" 2>/dev/null; then
    echo running
    exit 0
fi
finished # it wrote its exit code and ended since the first look
echo failed
