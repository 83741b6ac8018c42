#!/usr/bin/env bash
# Make sure the system packages Hearth needs are present.
#   - python3 with venv support (to build .venv)
#   - Mosquitto 2 with its dynamic-security plugin (the broker `hearth up` supervises)
#   - a C compiler and the Mosquitto and OpenSSL headers, to build Hearth's own Mosquitto
#     plugin (certificate CN = MQTT username; src/hearth/service/mosquitto_identity.c)
#   - SoftHSM2 (the PKCS#11 key store's tests sign with a real software token)
#   - Chromium (only when HEARTH_NEED_BROWSER=1: the web app's browser tests)
# As root on Debian we install what is missing with apt-get; otherwise we say what to install.
set -euo pipefail

missing=()
command -v python3 >/dev/null 2>&1 || missing+=(python3)
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || missing+=(python3-venv)
{ command -v mosquitto || [[ -x /usr/sbin/mosquitto ]]; } >/dev/null 2>&1 \
  && compgen -G "/usr/lib/*/mosquitto_dynamic_security.so" >/dev/null 2>&1 \
  || missing+=(mosquitto)
{ command -v cc || command -v gcc; } >/dev/null 2>&1 || missing+=(gcc)
[[ -f /usr/include/mosquitto_broker.h && -f /usr/include/mosquitto_plugin.h ]] \
  || missing+=(mosquitto-dev)
[[ -f /usr/include/mosquitto.h ]] || missing+=(libmosquitto-dev)
[[ -f /usr/include/openssl/x509.h ]] || missing+=(libssl-dev)
command -v softhsm2-util >/dev/null 2>&1 && ls /usr/lib/softhsm/libsofthsm2.so >/dev/null 2>&1 \
  || missing+=(softhsm2)
if [[ "${HEARTH_NEED_BROWSER:-0}" == "1" ]]; then
  command -v chromium >/dev/null 2>&1 || missing+=(chromium)
fi

if [[ ${#missing[@]} -eq 0 ]]; then
  echo "==> System packages present: python3 (venv), mosquitto, plugin build tools, softhsm2$([[ "${HEARTH_NEED_BROWSER:-0}" == "1" ]] && echo ", chromium")"
  exit 0
fi

if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
  echo "==> Installing system packages with apt-get: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  echo "==> Installed: ${missing[*]}"
else
  echo "Hearth needs these system packages, which are missing: ${missing[*]}" >&2
  echo "Install them as root, for example:  sudo apt-get install ${missing[*]}" >&2
  exit 1
fi
