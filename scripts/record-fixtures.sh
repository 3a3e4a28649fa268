#!/usr/bin/env bash
# Re-records the SOAP fixtures of dvmm-vsphere's reader/decoder unit tests
# from a fresh vcsim (default inventory) with curl.
#
# Usage: scripts/record-fixtures.sh        (needs vcsim: scripts/build-vcsim.sh)
# Env:   VCSIM_BIN  vcsim binary (default <workspace>/target/vcsim/bin/vcsim)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
vcsim="${VCSIM_BIN:-$root/target/vcsim/bin/vcsim}"
out="$root/dvmm-vsphere/fixtures"
mkdir -p "$out"
work="$(mktemp -d)"
trap 'kill "$pid" 2>/dev/null || true; rm -rf "$work"' EXIT

"$vcsim" -l 127.0.0.1:0 >"$work/env" 2>"$work/log" &
pid=$!
for _ in $(seq 100); do grep -q GOVC_URL "$work/env" && break; sleep 0.1; done
url="$(sed -n 's/.*GOVC_URL=https:\/\/[^@]*@\([^ ]*\).*/https:\/\/\1/p' "$work/env")"
[[ -n "$url" ]] || { echo "vcsim did not start" >&2; exit 1; }

# call NAME BODY [cookie]: posts a vim25 request, stores the response.
call() {
    local name="$1" body="$2"
    local envelope='<?xml version="1.0" encoding="UTF-8"?><soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" xmlns:xsd="http://www.w3.org/2001/XMLSchema" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><soapenv:Body>'"$body"'</soapenv:Body></soapenv:Envelope>'
    curl -sk -b "$work/cookies" -c "$work/cookies" -H 'Content-Type: text/xml; charset=utf-8' \
        -H 'SOAPAction: "urn:vim25/6.5"' --data-binary "$envelope" "$url" >"$out/$name.xml"
}
v() { printf '<%s xmlns="urn:vim25">%s</%s>' "$1" "$2" "$1"; }
returnval() { sed -n 's/.*<returnval type="[^"]*">\([^<]*\)<\/returnval>.*/\1/p' "$out/$1.xml"; }

call RetrieveServiceContent "$(v RetrieveServiceContent '<_this type="ServiceInstance">ServiceInstance</_this>')"
call FindByInventoryPath-NotAuthenticated "$(v FindByInventoryPath '<_this type="SearchIndex">SearchIndex</_this><inventoryPath>DC0/vm</inventoryPath>')"
call RetrievePropertiesEx-NotAuthenticated "$(v RetrievePropertiesEx '<_this type="PropertyCollector">propertyCollector</_this><specSet><propSet><type>Folder</type><pathSet>name</pathSet></propSet><objectSet><obj type="Folder">group-d1</obj></objectSet></specSet><options></options>')"
call Login-InvalidLogin "$(v Login '<_this type="SessionManager">SessionManager</_this><userName>user</userName><password></password>')"
call Login "$(v Login '<_this type="SessionManager">SessionManager</_this><userName>user</userName><password>pass</password>')"
call FindByInventoryPath-vm "$(v FindByInventoryPath '<_this type="SearchIndex">SearchIndex</_this><inventoryPath>DC0/vm/DC0_C0_RP0_VM0</inventoryPath>')"
vm="$(returnval FindByInventoryPath-vm)"
call FindByInventoryPath-none "$(v FindByInventoryPath '<_this type="SearchIndex">SearchIndex</_this><inventoryPath>DC0/vm/nothing-here</inventoryPath>')"
call RetrievePropertiesEx-vm "$(v RetrievePropertiesEx '<_this type="PropertyCollector">propertyCollector</_this><specSet><propSet><type>VirtualMachine</type><pathSet>name</pathSet><pathSet>parent</pathSet><pathSet>config.hardware</pathSet><pathSet>config.extraConfig</pathSet><pathSet>guest</pathSet><pathSet>runtime</pathSet><pathSet>summary</pathSet></propSet><objectSet><obj type="VirtualMachine">'"$vm"'</obj></objectSet></specSet><options></options>')"
call RetrievePropertiesEx-dvpg "$(v RetrievePropertiesEx '<_this type="PropertyCollector">propertyCollector</_this><specSet><propSet><type>DistributedVirtualPortgroup</type><pathSet>config.key</pathSet><pathSet>config.distributedVirtualSwitch</pathSet></propSet><objectSet><obj type="DistributedVirtualPortgroup">dvportgroup-13</obj></objectSet></specSet><options></options>')"
call FindByInventoryPath-vmfolder "$(v FindByInventoryPath '<_this type="SearchIndex">SearchIndex</_this><inventoryPath>DC0/vm</inventoryPath>')"
vmfolder="$(returnval FindByInventoryPath-vmfolder)"
call CreateFolder "$(v CreateFolder '<_this type="Folder">'"$vmfolder"'</_this><name>fixtures</name>')"
call CreateFolder-DuplicateName "$(v CreateFolder '<_this type="Folder">'"$vmfolder"'</_this><name>fixtures</name>')"
call CloneVM_Task-ManagedObjectNotFound "$(v CloneVM_Task '<_this type="VirtualMachine">vm-9999</_this><folder type="Folder">'"$vmfolder"'</folder><name>x</name><spec><location></location><template>false</template><powerOn>false</powerOn></spec>')"
call PowerOnVM_Task-already-on "$(v PowerOnVM_Task '<_this type="VirtualMachine">'"$vm"'</_this>')"
task="$(returnval PowerOnVM_Task-already-on)"
call RetrievePropertiesEx-Task-InvalidPowerState "$(v RetrievePropertiesEx '<_this type="PropertyCollector">propertyCollector</_this><specSet><propSet><type>Task</type><pathSet>info.state</pathSet><pathSet>info.result</pathSet><pathSet>info.error</pathSet></propSet><objectSet><obj type="Task">'"$task"'</obj></objectSet></specSet><options></options>')"
call CreatePropertyCollector "$(v CreatePropertyCollector '<_this type="PropertyCollector">propertyCollector</_this>')"
pc="$(returnval CreatePropertyCollector)"
call CreateFilter "$(v CreateFilter '<_this type="PropertyCollector">'"$pc"'</_this><spec><propSet><type>VirtualMachine</type><pathSet>runtime.powerState</pathSet><pathSet>guest.toolsRunningStatus</pathSet><pathSet>guest.ipAddress</pathSet><pathSet>guest.net</pathSet></propSet><objectSet><obj type="VirtualMachine">'"$vm"'</obj></objectSet></spec><partialUpdates>false</partialUpdates>')"
call WaitForUpdatesEx-initial "$(v WaitForUpdatesEx '<_this type="PropertyCollector">'"$pc"'</_this><version></version><options><maxWaitSeconds>1</maxWaitSeconds></options>')"
call ReconfigVM_Task-SET-guest "$(v ReconfigVM_Task '<_this type="VirtualMachine">'"$vm"'</_this><spec><extraConfig><key>SET.guest.toolsRunningStatus</key><value xsi:type="xsd:string">guestToolsRunning</value></extraConfig><extraConfig><key>SET.guest.ipAddress</key><value xsi:type="xsd:string">10.0.0.42</value></extraConfig></spec>')"
call WaitForUpdatesEx-change "$(v WaitForUpdatesEx '<_this type="PropertyCollector">'"$pc"'</_this><version>-</version><options><maxWaitSeconds>2</maxWaitSeconds></options>')"
call WaitForUpdatesEx-timeout "$(v WaitForUpdatesEx '<_this type="PropertyCollector">'"$pc"'</_this><version>-</version><options><maxWaitSeconds>1</maxWaitSeconds></options>')"
call DestroyPropertyCollector "$(v DestroyPropertyCollector '<_this type="PropertyCollector">'"$pc"'</_this>')"
call Logout "$(v Logout '<_this type="SessionManager">SessionManager</_this>')"
call CreateFolder-after-Logout "$(v CreateFolder '<_this type="Folder">'"$vmfolder"'</_this><name>late</name>')"

# The datastore id embeds vcsim's random temp folder: make it stable.
sed -i -E 's#/tmp/[A-Za-z0-9_.-]+#/TMPDIR#g' "$out"/*.xml
ls -1 "$out"
