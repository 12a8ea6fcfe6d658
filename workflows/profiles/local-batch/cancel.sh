#!/bin/sh
# cancel.sh JOBID...: end local-batch jobs (submit.sh), every process of each, as scancel does
# (--cluster-generic-cancel-cmd). A job is a session of its own (setsid; its pid is the session
# id), which also holds the process group that timeout makes for --time.
spool=${LOCAL_BATCH_SPOOL:-.snakemake/local-batch}
for id in "$@"; do
    if [ -f "$spool/$id/pid" ] && [ ! -f "$spool/$id/exit_code" ]; then
        pkill -TERM -s "$(cat "$spool/$id/pid")" || true
    fi
done
