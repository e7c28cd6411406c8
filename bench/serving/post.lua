-- wrk script: POST the same prepared body on every request.
-- BODY_FILE: the body; CTYPE: its content type; HEADER_LEN: Inference-Header-Content-Length (binary v2), optional.
local f = assert(io.open(os.getenv("BODY_FILE"), "rb"))
wrk.body = f:read("*a")
f:close()
wrk.method = "POST"
wrk.headers["Content-Type"] = os.getenv("CTYPE") or "application/json"
local hl = os.getenv("HEADER_LEN")
if hl ~= nil and hl ~= "" then
  wrk.headers["Inference-Header-Content-Length"] = hl
end
