# Shared helpers for recipes/<corpus>/run.sh (sourced, not executed).
#   log MESSAGE...            timestamped message on stderr, prefixed with the calling script
#   parse_options "$@"        ESPnet-style --name value options for variables defined beforehand
#                             (--stop_stage 3 sets stop_stage=3); --help prints them

log() {
  local fname=${BASH_SOURCE[1]##*/}
  echo -e "$(date '+%Y-%m-%dT%H:%M:%S') (${fname}:${BASH_LINENO[0]}:${FUNCNAME[1]}) $*" >&2
}

parse_options() {
  while [ $# -gt 0 ]; do
    case "$1" in
      --help|-h)
        echo "usage: $0 [--name value ...]; options and defaults:" >&2
        for v in ${RECIPE_OPTIONS}; do echo "  --${v} ${!v}" >&2; done
        exit 0 ;;
      --*)
        local name=${1#--}
        name=${name//-/_}
        if [[ " ${RECIPE_OPTIONS} " != *" ${name} "* ]]; then
          echo "$0: unknown option $1 (known: ${RECIPE_OPTIONS})" >&2; exit 2
        fi
        if [ $# -lt 2 ]; then echo "$0: option $1 needs a value" >&2; exit 2; fi
        printf -v "$name" '%s' "$2"
        shift 2 ;;
      *) echo "$0: unexpected argument $1" >&2; exit 2 ;;
    esac
  done
}

# stage_on N: true when stage N lies between --stage and --stop_stage
stage_on() { [ "${stage}" -le "$1" ] && [ "${stop_stage}" -ge "$1" ]; }
