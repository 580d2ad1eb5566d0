#!/usr/bin/env bash
# vitrine's nightly job: bring the live index up to date with the shop's catalog export.
#
#   - no live index yet, FULL_REBUILD=1, or today is REBUILD_WEEKDAY: a full rebuild
#       vitrine ingest      (reads the CSV, downloads new and changed image URLs into the image cache)
#       vitrine index build (embeds everything, trains a fresh quantizer, validates, publishes)
#   - every other night: vitrine index update (new and changed images are embedded, unchanged ones keep
#     their embeddings, deleted products go; the live quantizer is reused; validated and published)
#
# Either way a new version is published only when it passes the recall gate: on any failure the job
# exits non-zero, its last line says "FAILED (exit N) at <step>: CURRENT is still <version>", and
# CURRENT (what `vitrine serve` answers from, hot-swapping when it moves) is left as
# it was. Run it from cron or a systemd timer, e.g. at 03:15 every night:
#
#   15 3 * * *  CATALOG_CSV=/data/export/products.csv CATALOG_CONFIG=/etc/vitrine/columns.json \
#               VITRINE_HOME=/var/lib/vitrine /opt/vitrine/examples/nightly/nightly.sh >> /var/log/vitrine-nightly.log 2>&1
#
# Settings (environment):
#   CATALOG_CSV      the catalog export (required)
#   CATALOG_CONFIG   its column mapping, JSON (model.catalog.CatalogConfig); default: vitrine's defaults
#   IMAGES           folder of the images named by image_pattern, or where the image column's relative paths
#                    start (default: the CSV's folder; not needed when the image column holds URLs)
#   VITRINE_HOME     working folder: index/, shards/, image-cache/ (default ./vitrine-data)
#   MODEL            checkpoint for full rebuilds (default: the committed default model)
#   REBUILD_WEEKDAY  day of the week (1 = Monday ... 7 = Sunday) of the weekly full rebuild (default 7)
#   FULL_REBUILD     1: rebuild fully tonight whatever the day
#   KEEP             index versions kept (default 5)
#   VITRINE          the vitrine command (default: vitrine on PATH)
set -euo pipefail

if [ "$#" -gt 0 ]; then  # settings are environment variables only; an argument (even --help) used to be ignored
    case "$1" in
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "nightly.sh: takes no arguments (got $1); its settings are environment variables, see --help" >&2
           exit 2 ;;
    esac
fi

: "${CATALOG_CSV:?set CATALOG_CSV to the catalog export (a CSV file)}"
VITRINE_HOME=${VITRINE_HOME:-./vitrine-data}
REBUILD_WEEKDAY=${REBUILD_WEEKDAY:-7}
KEEP=${KEEP:-5}
VITRINE=${VITRINE:-vitrine}
INDEX="$VITRINE_HOME/index"
CACHE="$VITRINE_HOME/image-cache"

log() { echo "$(date -u +%FT%TZ) nightly: $*"; }
step="start"
# a failed step (set -e) ends the log with a line that says so and what CURRENT still serves, not with the
# last vitrine command's error alone; the exit status stays the failed command's (1: refused, 2: bad input)
on_exit() {
    status=$?
    [ "$status" = 0 ] && return
    live=$(cat "$INDEX/CURRENT" 2>/dev/null || echo "nothing")
    log "FAILED (exit $status) at $step: CURRENT is still $live"
}
trap on_exit EXIT

[ -f "$CATALOG_CSV" ] || { log "catalog export $CATALOG_CSV does not exist"; exit 2; }
mkdir -p "$VITRINE_HOME"
catalog=(--csv "$CATALOG_CSV")
[ -n "${CATALOG_CONFIG:-}" ] && catalog+=(--catalog-config "$CATALOG_CONFIG")
# ingest and index update need --images for an image_pattern catalog; the CSV's folder is the documented default
catalog+=(--images "${IMAGES:-$(dirname "$CATALOG_CSV")}")

full=${FULL_REBUILD:-0}
[ -f "$INDEX/CURRENT" ] || full=1
[ "$(date +%u)" = "$REBUILD_WEEKDAY" ] && full=1

if [ "$full" = 1 ]; then
    stamp=$(date -u +%Y%m%dT%H%M%SZ)
    shards="$VITRINE_HOME/shards/$stamp"
    log "full rebuild from $CATALOG_CSV into $shards"
    step="ingest"
    "$VITRINE" ingest "${catalog[@]}" --out "$shards" --image-cache "$CACHE"
    model=()
    [ -n "${MODEL:-}" ] && model=(--model "$MODEL")
    step="index build"
    "$VITRINE" index build --shards "$shards" --index-root "$INDEX" --keep "$KEEP" "${model[@]}"
    # keep the two newest ingests (tonight's and the one before, for a rollback's rebuild)
    find "$VITRINE_HOME/shards" -mindepth 1 -maxdepth 1 -type d | sort | head -n -2 | xargs -r rm -rf
else
    log "incremental update of $(cat "$INDEX/CURRENT") from $CATALOG_CSV"
    step="index update"
    "$VITRINE" index update "${catalog[@]}" --index-root "$INDEX" --image-cache "$CACHE" --keep "$KEEP"
fi
log "done: CURRENT is $(cat "$INDEX/CURRENT")"
