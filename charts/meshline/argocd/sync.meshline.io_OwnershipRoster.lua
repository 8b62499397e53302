-- Argo CD health of a Meshline OwnershipRoster (gopher-lua, Lua 5.1).
-- Progressing until the controller has seen this generation; Degraded when it
-- did not accept the roster, or when its audit schedule is one Kubernetes
-- refuses (AuditScheduled False, InvalidSchedule: no flow of it is audited);
-- Healthy otherwise. Flows of the namespace that no
-- roster gives a sync owner are named in the message but do not degrade the
-- roster: each such flow is Degraded itself (OwnerAssigned False), in the
-- Application that holds it.
local function health(status, message)
  return {status = status, message = message}
end
local st = obj.status
if st == nil or st.observedGeneration == nil or st.observedGeneration ~= obj.metadata.generation then
  return health("Progressing", "waiting for the Meshline controller to observe generation " ..
    tostring(obj.metadata.generation))
end
for _, cond in ipairs(st.conditions or {}) do
  if cond.type == "AuditScheduled" and cond.reason == "InvalidSchedule" then
    return health("Degraded", cond.message)
  end
end
for _, cond in ipairs(st.conditions or {}) do
  if cond.type == "Accepted" then
    if cond.status == "True" then return health("Healthy", cond.message) end
    return health("Degraded", cond.message)
  end
end
return health("Progressing", "waiting for the Meshline controller's Accepted condition")
