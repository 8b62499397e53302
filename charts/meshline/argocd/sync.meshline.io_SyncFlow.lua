-- Argo CD health of a Meshline SyncFlow (gopher-lua, Lua 5.1). Worst first:
-- Progressing until the controller has seen this generation; Degraded when the
-- flow is (Degraded True), the canary of its contract's current candidate was
-- aborted or that candidate was refused; Suspended when paused (spec.paused, a
-- paused canary) or when a contract change waits for people (sign-offs, a
-- version range); Progressing during a preflight, a canary (Progressing,
-- Promoting, Aborting) or a worker rollout; Healthy otherwise.
-- ContractUpToDate False reasons (copied from the contract's Ready) that refuse
-- the change; any other reason is a change still on its way (PreflightRunning,
-- ChangePending, CanaryRunning), not a fault. CanaryAborted: a canary (of this
-- flow or another bound flow) rejected the candidate.
local refused = {CompileFailed = true, IncompatibleChange = true, ContentChangedWithoutVersion = true,
  PreflightFailed = true, SupersededContent = true, Replaced = true, Rejected = true,
  CanaryAborted = true}
local waiting = {AwaitingSignOff = true, OutsideFlowRange = true}
local function health(status, message)
  return {status = status, message = message}
end
local st = obj.status
if st == nil or st.observedGeneration == nil or st.observedGeneration ~= obj.metadata.generation then
  return health("Progressing", "waiting for the Meshline controller to observe generation " ..
    tostring(obj.metadata.generation))
end
local c = {}
for _, cond in ipairs(st.conditions or {}) do
  c[cond.type] = cond
end
local canary = st.canary or {}
local up = c.ContractUpToDate
local changeHeld = up ~= nil and up.status == "False"
if c.Degraded ~= nil and c.Degraded.status == "True" then
  return health("Degraded", c.Degraded.message)
end
-- An aborted canary degrades the flow while its candidate is still the
-- contract's spec (ContractUpToDate says CanaryAborted); once the contract
-- moves on (reverted, a new version) the abort is history, not a fault.
if canary.phase == "Aborted" and changeHeld and up.reason == "CanaryAborted" then
  return health("Degraded", "canary of version " .. tostring(canary.version) .. " aborted: " ..
    tostring(canary.message or "no reason given"))
end
if changeHeld and refused[up.reason] then
  return health("Degraded", up.message)
end
if c.Ready ~= nil and c.Ready.reason == "Paused" then
  return health("Suspended", c.Ready.message)
end
if obj.spec ~= nil and obj.spec.paused == true then
  return health("Suspended", "paused by spec.paused")
end
-- Suspended, not Progressing: a paused canary waits for a person, not for the
-- controller, and Argo Rollouts reports a paused Rollout as Suspended too;
-- Progressing would promise progress that no one is making.
if canary.phase == "Paused" then
  return health("Suspended", "canary of version " .. tostring(canary.version) .. " paused at weight " ..
    tostring(canary.weight or 0) .. (canary.message ~= nil and (": " .. canary.message) or ""))
end
if changeHeld and waiting[up.reason] then
  return health("Suspended", up.message)
end
local moving = {Progressing = true, Promoting = true, Aborting = true}
if moving[canary.phase] then
  return health("Progressing", "canary of version " .. tostring(canary.version) .. " " ..
    string.lower(canary.phase) .. " at weight " .. tostring(canary.weight or 0) ..
    (canary.message ~= nil and (": " .. canary.message) or ""))
end
if changeHeld then
  return health("Progressing", up.message)
end
if st.preflight ~= nil and st.preflight.phase == "Running" then
  return health("Progressing", "preflight replay of version " .. tostring(st.preflight.version) ..
    " is running")
end
if c.Progressing ~= nil and c.Progressing.status == "True" then
  return health("Progressing", c.Progressing.message)
end
if c.Ready ~= nil and c.Ready.status == "True" then
  return health("Healthy", c.Ready.message)
end
-- Ready False with nothing above to explain it: the workers cannot do the work.
if c.Ready ~= nil and c.Ready.status == "False" then
  return health("Degraded", c.Ready.message)
end
return health("Progressing", "waiting for the Meshline controller's Ready condition")
