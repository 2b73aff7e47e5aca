# Sitewarden bank pack: may this site join this federated fine-tuning job?
#
# Input: policies/schemas/federation.input.schema.json. Knobs: data.sitewarden.bank.federation.
# The agent computes differential_privacy.epsilon itself from the job's DP parameters (the
# controller's own figure comes as epsilon_declared), and job.app is the Flower App release it
# verified (approvers this site trusts): neither is taken from the controller's word.
#
# Convention (see inference.rego and README.md): every rule is a function of its input; only
# `decision` reads `input`. Messages are built with m([...]), never sprintf on a string (rego-cpp quirk).
package sitewarden.federation

decision := decide(input)

decide(inp) := verdict(inp, violations(inp))

# Violations are computed once and passed on (rego-cpp does not memoise function calls).
verdict(inp, v) := {
	"allow": true,
	"reasons": sorted(allow_reasons(inp)),
	"obligations": {},
} if {
	count(v) == 0
} else := {
	"allow": false,
	"reasons": sorted(v),
	"obligations": {},
}

# sorted(s): the set s as a sorted array. rego-cpp quirk: sort() of a SET yields a value that prints
# as an array but is not equal to one and cannot be indexed; sort() of an array is fine.
sorted(s) := sort([x | some x in s])

# m(parts): a message, the parts concatenated; strings as they are, anything else as sprintf "%v"
# prints it. rego-cpp's sprintf emits some strings wrapped in raw quotes (see inference.rego).
m(parts) := concat("", [str(p) | some p in parts])

str(x) := x if {
	is_string(x)
} else := sprintf("%v", [x])

job_label(inp) := m(["job ", object.get(inp, ["job", "id"], "?")])

dp(inp) := d if {
	d := inp.job.differential_privacy
	is_object(d)
} else := {}


violations(inp) := ((dp_violations(inp) | secagg_violations(inp)) | sites_violations(inp)) | app_violations(inp)

dp_violations(inp) := {msg |
	not dp(inp).enabled == true
	msg := m([job_label(inp), " does not enable differential privacy"])
} | {msg |
	not is_number(dp(inp).epsilon)
	msg := m([job_label(inp), " has no finite differential privacy epsilon (the budget must be at most ", data.sitewarden.bank.federation.max_epsilon, ")"])
} | {msg |
	eps := dp(inp).epsilon
	declared := dp(inp).epsilon_declared
	is_number(eps)
	is_number(declared)
	declared < eps * 0.999
	msg := m([job_label(inp), " declares epsilon ", declared, " but its parameters spend ", eps, " (computed at this site)"])
} | {msg |
	eps := dp(inp).epsilon
	is_number(eps)
	eps > data.sitewarden.bank.federation.max_epsilon
	msg := m([job_label(inp), " spends epsilon ", eps, ", above the maximum ", data.sitewarden.bank.federation.max_epsilon])
}

secagg_violations(inp) := {msg |
	not inp.job.secure_aggregation == true
	msg := m([job_label(inp), " does not use secure aggregation"])
}

sites_violations(inp) := {msg |
	not is_number(inp.job.min_sites)
	msg := m([job_label(inp), " declares no min_sites (at least ", data.sitewarden.bank.federation.min_sites, " needed)"])
} | {msg |
	is_number(inp.job.min_sites)
	inp.job.min_sites < data.sitewarden.bank.federation.min_sites
	msg := m([job_label(inp), " needs only ", inp.job.min_sites, " site(s); at least ", data.sitewarden.bank.federation.min_sites, " needed so no single site's updates are exposed"])
}

app_violations(inp) := {msg |
	not approved_app(inp)
	msg := m([job_label(inp), " runs no Flower App approved by an approver this site trusts"])
}

approved_app(inp) if {
	is_string(inp.job.app.fab_sha256)
	count(inp.job.app.approvers) > 0
}

allow_reasons(inp) := {
	m([job_label(inp), " enables differential privacy with epsilon ", dp(inp).epsilon, " (computed at this site), within the maximum ", data.sitewarden.bank.federation.max_epsilon]),
	m([job_label(inp), " runs Flower App ", inp.job.app.name, " ", inp.job.app.version, ", approved by ", concat(", ", inp.job.app.approvers)]),
	m([job_label(inp), " uses secure aggregation"]),
	m([job_label(inp), " needs at least ", inp.job.min_sites, " sites (minimum ", data.sitewarden.bank.federation.min_sites, ")"]),
}
