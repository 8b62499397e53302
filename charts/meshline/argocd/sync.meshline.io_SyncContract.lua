-- Argo CD health of a Meshline SyncContract (gopher-lua, Lua 5.1). Progressing
-- until the controller has seen this generation, while the candidate is in
-- preflight or canary; Suspended while it waits for people (sign-offs, a
-- version range a bound flow must widen); Degraded when the spec was refused
-- (it never reaches the workers, who keep the active version); Healthy when
-- the spec is the active revision.
-- Ready False reasons of a candidate on its way; every other one refuses the
-- spec (IncompatibleChange, PreflightFailed, CompileFailed, Replaced,
-- CanaryAborted: a bound flow's canary rolled the candidate back, ...).
local waiting = {AwaitingSignOff = true, OutsideFlowRange = true}
local running = {PreflightRunning = true, CanaryRunning = true}
local function health(status, message)
  return {status = status, message = message}
end
local st = obj.status
if st == nil or st.observedGeneration == nil or st.observedGeneration ~= obj.metadata.generation then
  return health("Progressing", "waiting for the Meshline controller to observe generation " ..
    tostring(obj.metadata.generation))
end
local ready = nil
for _, cond in ipairs(st.conditions or {}) do
  if cond.type == "Ready" then ready = cond end
end
local candidate = nil
if st.candidateRevision ~= nil then
  for _, r in ipairs(st.revisions or {}) do
    if r.name == st.candidateRevision then candidate = r end
  end
end
if candidate ~= nil and candidate.state == "Rejected" then
  return health("Degraded", "version " .. tostring(candidate.version) .. " was rejected: " ..
    tostring(candidate.message or candidate.reason))
end
if candidate ~= nil and (candidate.state == "Preflight" or candidate.state == "Canary") then
  return health("Progressing", ready ~= nil and ready.message or
    ("version " .. tostring(candidate.version) .. " is in " .. candidate.state))
end
if ready == nil then
  return health("Progressing", "waiting for the Meshline controller's Ready condition")
end
if ready.status == "True" then
  return health("Healthy", ready.message)
end
if waiting[ready.reason] then
  return health("Suspended", ready.message)
end
if running[ready.reason] then
  return health("Progressing", ready.message)
end
return health("Degraded", ready.message)
