#!/usr/bin/env bash
# Install the Outpost agent on a device as a systemd service. Idempotent: run it again to
# upgrade or repair; what is already right is left alone (an edited agent.toml is never replaced).
#
#   sudo systemd/install.sh [--fleet URL --token TOKEN] [--trust PUBLISHER.pub] [--gpu|--cpu] [--dry-run]
#
# Steps (each printed as it runs; --dry-run prints them and changes nothing):
#   1. the system user `outpost`
#   2. a virtual environment in /opt/outpost/.venv with outpost[gpu] when an NVIDIA GPU is found
#      (or --gpu), else outpost[cpu]
#   3. the units in /etc/systemd/system (+ the GPU drop-in on GPU devices)
#   4. /etc/outpost with a template agent.toml (+ the publisher key in /etc/outpost/trusted)
#   5. enrollment: outpost agent enroll --fleet URL --token TOKEN (once), credential and fleet
#      key written to /var/lib/outpost/credential.json and fleet-assignment.pub, where agent.toml
#      expects them
#   6. systemctl daemon-reload, enable --now outpost-agent.service
#
# Options:
#   --fleet URL --token T  enroll with this fleet (the token is a one-time enrollment token)
#   --trust FILE           the publisher public key bundles must be signed by
#                          (installed as /etc/outpost/trusted/publisher.pub, named in agent.toml)
#   --gpu | --cpu          force the runtime instead of detecting an NVIDIA GPU
#   --from SPEC            what pip installs (default: this checkout); e.g. a wheel or outpost==0.1.0
#   --pip-arg ARG          extra pip argument (repeatable), e.g. --pip-arg=--no-index
#   --python PY            interpreter for the venv (default: python3)
#   --no-start             enable the service but do not start it now
#   --root DIR             install under DIR (a fake /opt and /etc/systemd/system: tests and
#                          image builds); user creation, chgrp of agent.toml, enrollment,
#                          daemon-reload and start are printed, not run (run them on the
#                          device); `systemctl --root=DIR enable` runs (offline)
#   --dry-run              print every step, change nothing
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
source_dir="$(cd "$here/.." && pwd)"

root="" dry_run=0 runtime="" fleet_url="" token="" spec="" python=python3 start=1 trust=""
pip_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --root) root="${2:?--root needs a directory}"; shift ;;
    --root=*) root="${1#*=}" ;;
    --gpu) runtime=gpu ;;
    --cpu) runtime=cpu ;;
    --fleet) fleet_url="${2:?--fleet needs a URL}"; shift ;;
    --fleet=*) fleet_url="${1#*=}" ;;
    --token) token="${2:?--token needs a value}"; shift ;;
    --token=*) token="${1#*=}" ;;
    --trust) trust="${2:?--trust needs a public key file}"; shift ;;
    --trust=*) trust="${1#*=}" ;;
    --from) spec="${2:?--from needs a pip requirement}"; shift ;;
    --from=*) spec="${1#*=}" ;;
    --pip-arg) pip_args+=("${2:?--pip-arg needs a value}"); shift ;;
    --pip-arg=*) pip_args+=("${1#*=}") ;;
    --python) python="${2:?--python needs an interpreter}"; shift ;;
    --python=*) python="${1#*=}" ;;
    --no-start) start=0 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "install.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
if { [ -n "$fleet_url" ] && [ -z "$token" ]; } || { [ -z "$fleet_url" ] && [ -n "$token" ]; }; then
  echo "install.sh: --fleet and --token go together" >&2; exit 2
fi
if [ -n "$root" ]; then
  [ "$dry_run" = 1 ] || mkdir -p "$root"
  root="$(cd "$root" 2>/dev/null && pwd || echo "$root")"
elif [ "$dry_run" = 0 ] && [ "$(id -u)" != 0 ]; then
  echo "install.sh: run as root (or with --dry-run, or --root DIR)" >&2; exit 1
fi

prefix="$root/opt/outpost"
venv="$prefix/.venv"
units="$root/etc/systemd/system"
etc="$root/etc/outpost"
state="$root/var/lib/outpost"
: "${spec:=$source_dir}"

# ---------------------------------------------------------------------------------- output

step() { printf '==> %s\n' "$*"; }
# Show a command as it would run, enrollment tokens masked (this output ends up in logs).
show() {
  local out="" masked=0 a
  for a in "$@"; do
    if [ "$masked" = 1 ]; then out+="******** "; masked=0; continue; fi
    [ "$a" = --token ] && masked=1
    out+="$(printf '%q ' "$a")"
  done
  printf '    $ %s\n' "${out% }"
}
# Run a command, or only show it under --dry-run.
run() {
  show "$@"
  [ "$dry_run" = 1 ] || "$@"
}
# Show a command that touches the live system; it runs only without --root and --dry-run.
run_host() {
  show "$@"
  if [ -n "$root" ]; then echo "    (not run under --root)"; return 0; fi
  [ "$dry_run" = 1 ] || "$@"
}

# ---------------------------------------------------------------------------------- 0. runtime

if [ -z "$runtime" ]; then
  if { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; } \
     || [ -e /dev/nvidiactl ] || [ -e /dev/nvhost-ctrl-gpu ]; then
    runtime=gpu
  else
    runtime=cpu
  fi
  detected=" (detected)"
else
  detected=" (forced)"
fi
note=""
[ "$dry_run" = 1 ] && note=" (dry run: nothing changes)"
step "runtime: $runtime$detected; installing under ${root:-/}$note"

# ---------------------------------------------------------------------------------- 1. user

step "1. system user outpost"
if getent passwd outpost >/dev/null 2>&1 && [ -z "$root" ]; then
  echo "    exists"
else
  run_host useradd --system --user-group --home-dir /var/lib/outpost --no-create-home \
    --shell /usr/sbin/nologin --comment "Outpost agent" outpost
fi
if [ "$runtime" = gpu ]; then
  # Jetson device nodes are group video; the GPU drop-in adds the group to the service too.
  if [ -n "$root" ] || getent group video >/dev/null 2>&1; then
    run_host usermod --append --groups video outpost
  else
    echo "    no group video on this host (x86 NVIDIA nodes are world-accessible): nothing to add"
  fi
fi

# ---------------------------------------------------------------------------------- 2. venv

step "2. virtual environment $venv with outpost[$runtime]"
if [ -x "$venv/bin/python" ]; then
  echo "    venv exists"
else
  run "$python" -m venv "$venv"
fi
want="$spec [$runtime] ${pip_args[*]:-}"
if [ -f "$spec/pyproject.toml" ]; then
  want+=" $(sha256sum "$spec/pyproject.toml" | cut -d' ' -f1)"
fi
stamp="$venv/.outpost-install"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "    outpost[$runtime] already installed from $spec"
else
  other=onnxruntime-gpu
  [ "$runtime" = gpu ] && other=onnxruntime
  # onnxruntime and onnxruntime-gpu install the same module: never leave both.
  show "$venv/bin/python" -m pip uninstall -q -y "$other"
  [ "$dry_run" = 1 ] || "$venv/bin/python" -m pip uninstall -q -y "$other" >/dev/null 2>&1 || true
  run "$venv/bin/python" -m pip install -q ${pip_args[@]+"${pip_args[@]}"} "$spec[$runtime]"
  if [ "$dry_run" = 0 ]; then echo "$want" > "$stamp"; fi
fi

# ---------------------------------------------------------------------------------- 3. units

step "3. units in $units"
changed=0
# install_file SRC DEST MODE: copy when the content differs (atomically: temp file, then rename).
install_file() {
  local src="$1" dest="$2" mode="$3"
  if [ -f "$dest" ] && cmp -s "$src" "$dest"; then
    echo "    unchanged $dest"
    return 0
  fi
  changed=1
  run install -D -m "$mode" "$src" "$dest.tmp"
  run mv -f "$dest.tmp" "$dest"
}
install_file "$here/outpost-agent.service" "$units/outpost-agent.service" 0644
install_file "$here/outpost-serve@.service" "$units/outpost-serve@.service" 0644
for unit in outpost-agent.service outpost-serve@.service; do
  dropin="$units/$unit.d/gpu.conf"
  if [ "$runtime" = gpu ]; then
    install_file "$here/outpost-gpu.conf" "$dropin" 0644
  elif [ -e "$dropin" ]; then
    changed=1
    run rm -f "$dropin"
  fi
done

# ---------------------------------------------------------------------------------- 4. config

step "4. configuration in $etc"
run install -d -m 0755 "$etc" "$etc/trusted"
if [ -e "$etc/agent.toml" ]; then
  echo "    kept existing $etc/agent.toml"
else
  echo "    write $etc/agent.toml (template, mode 0640)"
  if [ "$dry_run" = 0 ]; then
    tmp="$etc/.agent.toml.tmp"
    sed "s|@FLEET_URL@|${fleet_url:-https://fleet.example.com:8780}|" "$here/agent.toml.in" > "$tmp"
    chmod 0640 "$tmp"
    sync "$tmp" 2>/dev/null || true
    mv -f "$tmp" "$etc/agent.toml"
  fi
  run_host chgrp outpost "$etc/agent.toml"
fi
publisher="$etc/trusted/publisher.pub"
if [ -n "$trust" ]; then
  if [ "$dry_run" = 0 ] && [ -f "$publisher" ] && cmp -s "$trust" "$publisher"; then
    echo "    unchanged $publisher"
  else
    run install -m 0644 "$trust" "$publisher.tmp"
    run mv -f "$publisher.tmp" "$publisher"
  fi
elif [ ! -e "$publisher" ]; then
  echo "    NOTE: no publisher key yet: the agent refuses to start until $publisher exists (--trust FILE)"
fi

# ---------------------------------------------------------------------------------- 5. enrollment

step "5. enrollment"
enrolled="$state/.enrolled-with"
if [ -z "$fleet_url" ]; then
  echo "    skipped (no --fleet/--token); later: sudo -u outpost /opt/outpost/.venv/bin/outpost agent enroll --fleet URL --token T"
elif [ -f "$enrolled" ] && [ "$(cat "$enrolled")" = "$fleet_url" ]; then
  echo "    already enrolled with $fleet_url"
else
  run_host install -d -o outpost -g outpost -m 0700 /var/lib/outpost
  # As the service's user, in its state directory: the credential it writes (0600) is the agent's.
  run_host runuser -u outpost -- env -C /var/lib/outpost HOME=/var/lib/outpost /opt/outpost/.venv/bin/outpost agent enroll \
    --fleet "$fleet_url" --token "$token" --credential /var/lib/outpost/credential.json
  if [ -z "$root" ] && [ "$dry_run" = 0 ]; then echo "$fleet_url" > "$enrolled"; fi
fi

# ---------------------------------------------------------------------------------- 6. start

step "6. enable and start outpost-agent.service"
if [ -n "$root" ]; then
  # Offline: only creates the multi-user.target.wants symlink inside the root.
  run systemctl --root="$root" --quiet enable outpost-agent.service
  show systemctl daemon-reload; echo "    (not run under --root)"
  show systemctl enable --now outpost-agent.service; echo "    (not run under --root)"
else
  if [ "$changed" = 1 ]; then run systemctl daemon-reload; else echo "    units unchanged: no daemon-reload"; fi
  if [ "$start" = 1 ]; then
    if [ "$changed" = 1 ] && systemctl is-active --quiet outpost-agent.service 2>/dev/null; then
      # New units under a running agent: restart it onto them (SIGTERM drains, nothing is cut).
      run systemctl enable outpost-agent.service
      run systemctl restart outpost-agent.service
    else
      run systemctl enable --now outpost-agent.service
    fi
  else
    run systemctl enable outpost-agent.service
  fi
fi
step "done$note"
