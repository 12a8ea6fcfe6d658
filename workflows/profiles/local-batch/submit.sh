#!/bin/sh
# The stand-in batch system of the local-batch profile (workflows/profiles/local-batch): runs a
# job script on this machine, in the background, the way a batch system runs it on a node.
#
#   submit.sh [--job-name=NAME] [--cpus-per-task=N] [--mem=MB] [--time=MINUTES] JOBSCRIPT
#
# takes sbatch's options and prints the job id, as `sbatch --parsable` does. The job script is
# copied at submission (as sbatch does) and run in a session of its own (cancel.sh ends it) with
# --time minutes at most (coreutils' timeout; 0 or none: no limit). Memory and cores are recorded,
# not enforced. Everything about a job lies in $LOCAL_BATCH_SPOOL/<id>/ (default:
# .snakemake/local-batch in the working directory): request (the options, one key=value a line),
# jobscript, pid, output (the job's stdout and stderr) and, once it has ended, exit_code, which
# status.sh reads.
set -eu
spool=${LOCAL_BATCH_SPOOL:-.snakemake/local-batch}
name=job cpus=1 mem=0 minutes=0
while [ $# -gt 1 ]; do
    case $1 in
    --job-name=*) name=${1#*=} ;;
    --cpus-per-task=*) cpus=${1#*=} ;;
    --mem=*) mem=${1#*=} ;;
    --time=*) minutes=${1#*=} ;;
    *)
        echo "submit.sh: unknown option '$1'; expected --job-name=, --cpus-per-task=, --mem=," \
            "--time= and the job script last" >&2
        exit 2
        ;;
    esac
    shift
done
if [ $# -ne 1 ] || [ ! -f "$1" ]; then
    echo "submit.sh: expected the job script (a file) as the last argument" >&2
    exit 2
fi
case $cpus$mem$minutes in
*[!0-9]*)
    echo "submit.sh: --cpus-per-task, --mem and --time take whole numbers" \
        "(got $cpus, $mem, $minutes)" >&2
    exit 2
    ;;
esac
mkdir -p "$spool"
dir=$(cd "$(mktemp -d "$spool/XXXXXXXX")" && pwd)
id=${dir##*/}
cp "$1" "$dir/jobscript"
printf 'job_name=%s\ncpus_per_task=%s\nmem_mb=%s\nruntime=%s\n' "$name" "$cpus" "$mem" \
    "$minutes" >"$dir/request"
# the job: its own session (setsid), so that cancel.sh can end its whole process group; nothing
# of it stays attached to this script's stdout, which the submitter reads to its end
LOCAL_BATCH_JOB_ID=$id LOCAL_BATCH_CPUS=$cpus setsid sh -c '
    dir=$1 minutes=$2
    echo $$ >"$dir/pid"
    if [ "$minutes" -gt 0 ]; then
        timeout "${minutes}m" sh "$dir/jobscript"
    else
        sh "$dir/jobscript"
    fi >"$dir/output" 2>&1
    echo $? >"$dir/exit_code.part" && mv "$dir/exit_code.part" "$dir/exit_code"
' local-batch-job "$dir" "$minutes" </dev/null >/dev/null 2>&1 &
echo "$id"
