#!/usr/bin/env bash
# The README story, end to end, as one script: start a server, create a
# site and users, generate the company passcode, enroll agents, reset a
# passcode (with and without notifying the user), lock, follow the action
# log, read the emails, disable the passcode, unenroll.
#
# `cargo xtask demo` runs it with freshly built binaries; the test suite
# runs it too, so the README commands keep working. Inputs (environment):
#   MDM_SERVER_BIN, MDM_AGENT_BIN, GRPCURL   the three programs
#   WORK                                     an empty scratch directory
#   AGENTS                                   how many agents (default 3)
set -euo pipefail

: "${MDM_SERVER_BIN:?}" "${MDM_AGENT_BIN:?}" "${GRPCURL:?}" "${WORK:?}"
AGENTS="${AGENTS:-3}"
cd "$WORK"

step() { printf '\n==> %s\n' "$*"; }
json() { python3 -c "import json,sys; d=json.load(sys.stdin); print(eval(sys.argv[1], {'d': d}))" "$1"; }

PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

step "Start the server (zero configuration, first start)"
"$MDM_SERVER_BIN" serve --listen "127.0.0.1:$PORT" --heartbeat-interval 2s > server.out 2> server.log &
pids+=($!)
for _ in $(seq 1 100); do grep -q ' list$' server.out 2>/dev/null && break; sleep 0.1; done
cat server.out
C=mdm-data/credentials/owner
G="$GRPCURL -cacert $C/ca.crt -cert $C/admin.crt -key $C/admin.key"
A="localhost:$PORT"
for _ in $(seq 1 100); do $G $A grpc.health.v1.Health/Check >/dev/null 2>&1 && break; sleep 0.1; done

step "List the API through reflection"
$G $A list | grep mdm.v1

step "Create a site"
SITE=$($G -d '{"displayName": "Head office", "failedAttemptLimit": 10}' $A mdm.v1.SiteService/CreateSite | json 'd["site"]["siteId"]')
echo "site: $SITE"

step "Add users: one, then a CSV import (the bad row is reported with its line)"
$G -d "{\"siteId\": \"$SITE\", \"email\": \"alice@example.com\", \"displayName\": \"Alice\"}" $A mdm.v1.UserService/CreateUser | json 'd["user"]["email"]'
$G -d "{\"siteId\": \"$SITE\", \"csv\": \"email,display_name\\nbob@example.com,Bob\\ncarol@example.com,Carol\\nnot-an-email,Nobody\\n\"}" $A mdm.v1.UserService/ImportUsers

step "Generate the company passcode and read its info"
PASSCODE=$($G -d "{\"siteId\": \"$SITE\"}" $A mdm.v1.SiteService/GenerateCompanyPasscode | json 'd["passcode"]')
echo "company passcode: $PASSCODE (shown once)"
$G -d "{\"siteId\": \"$SITE\"}" $A mdm.v1.SiteService/GetCompanyPasscode

step "Enroll $AGENTS devices with the simulated backend and connect them"
users=(alice@example.com bob@example.com carol@example.com)
for i in $(seq 1 "$AGENTS"); do
  user=${users[$(( (i - 1) % 3 ))]}
  echo "$PASSCODE" | MDM_DEVICE_SERIAL="DEMO-$i" "$MDM_AGENT_BIN" --state-dir "agent-$i" enroll \
      --server "$A" --ca $C/ca.crt --email "$user" --passcode-stdin --backend simulated
  MDM_DEVICE_SERIAL="DEMO-$i" "$MDM_AGENT_BIN" --state-dir "agent-$i" run --backend simulated 2> "agent-$i.log" &
  pids+=($!)
done
DEVICE=$(python3 -c 'import json; print(json.load(open("agent-1/identity.json"))["device_id"])')
for _ in $(seq 1 100); do
  [ "$($G -d "{\"deviceId\": \"$DEVICE\"}" $A mdm.v1.DeviceService/GetDevice | json 'd["device"].get("online", False)')" = True ] && break
  sleep 0.1
done
$G -d "{\"siteId\": \"$SITE\"}" $A mdm.v1.DeviceService/ListDevices | json '"\n".join(x["deviceId"] + "  " + x["userEmail"] + "  online=" + str(x.get("online", False)) for x in d["devices"])'

step "Watch the site's action log in the background"
$G -max-time 8 -d "{\"siteId\": \"$SITE\"}" $A mdm.v1.ActionLogService/WatchActions > watch.json 2>/dev/null &
pids+=($!)
sleep 0.5

step "Reset the passcode of $DEVICE (the admin confirms its user)"
RESET=$($G -d "{\"deviceId\": \"$DEVICE\", \"confirmUserEmail\": \"alice@example.com\", \"message\": \"Call IT\"}" $A mdm.v1.DeviceService/ResetPasscode)
NEW=$(echo "$RESET" | json 'd["passcode"]')
ACTION=$(echo "$RESET" | json 'd["action"]["actionId"]')
echo "new device passcode: $NEW (action $ACTION)"

step "Reset again, also emailing the device's user"
RESET2=$($G -d "{\"deviceId\": \"$DEVICE\", \"confirmUserEmail\": \"alice@example.com\", \"notifyUser\": true}" $A mdm.v1.DeviceService/ResetPasscode)
NEW=$(echo "$RESET2" | json 'd["passcode"]')
ACTION=$(echo "$RESET2" | json 'd["action"]["actionId"]')
echo "new device passcode: $NEW (action $ACTION)"
for _ in $(seq 1 100); do
  [ "$($G -d "{\"actionId\": \"$ACTION\"}" $A mdm.v1.ActionLogService/GetAction | json 'd["action"]["status"]')" = ACTION_STATUS_SUCCEEDED ] && break
  sleep 0.1
done
$G -d "{\"actionId\": \"$ACTION\"}" $A mdm.v1.ActionLogService/GetAction | json '"\n".join(e["status"] + "  " + e.get("detail", "") for e in d["action"]["timeline"])'

step "Lock another device with a message"
DEVICE2=$(python3 -c 'import json; print(json.load(open("agent-2/identity.json"))["device_id"])' 2>/dev/null || echo "$DEVICE")
LOCK=$($G -d "{\"deviceId\": \"$DEVICE2\", \"message\": \"This laptop is locked. Call IT.\"}" $A mdm.v1.DeviceService/LockDevice | json 'd["action"]["actionId"]')
for _ in $(seq 1 100); do
  [ "$($G -d "{\"actionId\": \"$LOCK\"}" $A mdm.v1.ActionLogService/GetAction | json 'd["action"]["status"]')" = ACTION_STATUS_SUCCEEDED ] && break
  sleep 0.1
done
echo "lock: $($G -d "{\"actionId\": \"$LOCK\"}" $A mdm.v1.ActionLogService/GetAction | json 'd["action"]["status"]')"

step "The device's security section (every read of the passcode is audited)"
$G -d "{\"deviceId\": \"$DEVICE\"}" $A mdm.v1.DeviceService/GetDevice | json '"\n".join([k + ": " + str(v) for k, v in d["device"]["security"].items()] + ["audit: " + e["who"] + " " + e["what"] for e in d.get("auditTrail", [])])'
python3 -c 'import json; s=json.load(open("agent-1/simulated.json")); print("the device now has passcode", s["passcode"], "and locked =", s["locked"])'

step "The emails, from the .eml outbox (no SMTP relay configured)"
for _ in $(seq 1 50); do [ "$(ls mdm-data/outbox/mail 2>/dev/null | wc -l)" -ge 3 ] && break; sleep 0.1; done
for f in mdm-data/outbox/mail/*.eml; do
  printf '%s  ->  %s  |  %s\n' "$(basename "$f")" "$(grep -m1 '^To:' "$f")" "$(grep -m1 '^Subject:' "$f")"
done

step "The live watch saw"
wait "${pids[-1]}" 2>/dev/null || true
python3 -c '
import json, sys
text = open("watch.json").read()
dec = json.JSONDecoder(); i = 0; n = 0
while True:
    while i < len(text) and text[i].isspace(): i += 1
    if i >= len(text): break
    obj, i = dec.raw_decode(text, i); n += 1
    a = obj["action"]; print(a["actionId"][-12:], a["type"], a["status"])
print(n, "changes")'

step "Disable the company passcode: self-service enrollment is off"
$G -d "{\"siteId\": \"$SITE\"}" $A mdm.v1.SiteService/DisableCompanyPasscode | json 'd["info"]["state"]'
if echo "$PASSCODE" | "$MDM_AGENT_BIN" --state-dir agent-late enroll --server "$A" --ca $C/ca.crt --email alice@example.com --passcode-stdin 2> late.err; then
  echo "unexpected: enrollment worked with a disabled passcode"; exit 1
fi
cat late.err

step "Unenroll the last device: its agent removes its identity and exits"
LAST=$(python3 -c "import json; print(json.load(open('agent-$AGENTS/identity.json'))['device_id'])")
$G -d "{\"deviceId\": \"$LAST\"}" $A mdm.v1.DeviceService/UnenrollDevice | json 'd["action"]["status"]'
for _ in $(seq 1 50); do [ -e "agent-$AGENTS/identity.json" ] || break; sleep 0.1; done
[ -e "agent-$AGENTS/identity.json" ] && { echo "the unenrolled agent still has its identity"; exit 1; }
echo "agent-$AGENTS identity removed"

step "The site-wide action log"
$G -d "{\"siteId\": \"$SITE\"}" $A mdm.v1.ActionLogService/ListActions | python3 -c '
import json, sys
d = json.load(sys.stdin)
row = "%-25s %-28s %-24s %-16s %s"
print(row % ("CREATED", "TYPE", "STATUS", "DEVICE", "BY"))
for a in d["actions"]:
    print(row % (a["createdAt"], a["type"][12:], a["status"][14:], a["deviceId"], a["createdBy"]))'

printf '\nwalkthrough: all steps passed\n'
