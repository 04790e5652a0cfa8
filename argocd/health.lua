-- Argo CD resource health for Palisade's kinds (AuthPolicy, RateLimitPolicy, SecretBinding,
-- ImagePolicy), registered in argocd-cm under resource.customizations as palisade.dev/*
-- (argocd/argocd-cm.yaml).
-- Healthy: Ready=True for the current generation. Progressing: no status yet, an older
-- generation, or a condition the operator is still working through (Vault/OpenBao sealed or
-- unreachable). Degraded: Ready=False for any other reason, or a conflict with another policy.
local hs = {}
local transient = { VaultUnavailable = true, Pending = true, Reconciling = true }
if obj.status == nil or obj.status.conditions == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for Palisade to report a status"
  return hs
end
local ready = nil
for _, c in ipairs(obj.status.conditions) do
  if c.type == "Ready" then
    ready = c
  end
  if c.type == "Conflicted" and c.status == "True" then
    hs.status = "Degraded"
    hs.message = c.message or "Conflicts with another policy"
    return hs
  end
end
local generation = obj.metadata.generation
if ready == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the Ready condition"
  return hs
end
if generation ~= nil and ready.observedGeneration ~= nil and ready.observedGeneration < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for Palisade to reconcile generation " .. generation
  return hs
end
if ready.status == "True" then
  hs.status = "Healthy"
  hs.message = ready.message or "Ready"
  return hs
end
if ready.reason ~= nil and transient[ready.reason] then
  hs.status = "Progressing"
else
  hs.status = "Degraded"
end
hs.message = (ready.reason or "NotReady") .. ": " .. (ready.message or "")
return hs
