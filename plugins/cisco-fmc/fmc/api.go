package fmc

import (
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"net/url"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"time"
)

// The FMC REST API calls the plugin makes (sources in the README):
//
//   GET  /api/fmc_platform/v1/info/domain                         domain name -> UUID
//   GET  .../domain/{d}/object/dynamicobjects?name=N              one object by name
//   GET  .../domain/{d}/object/dynamicobjects?filter=nameStartsWith:P&expanded=true   owned objects, paged
//   POST .../domain/{d}/object/dynamicobjects?bulk=true           create objects (201)
//   GET  .../domain/{d}/object/dynamicobjects/{id}/mappings       an object's addresses, paged
//   POST .../domain/{d}/object/dynamicobjectmappings              add and remove in bulk (201)
//
// The access token is the host's business (a session login with
// `token_header = "X-auth-access-token"`): it signs in, adds the header and
// signs in again once on a 401.

// APIError is an answer FMC gave with an error status.
type APIError struct {
	Method, Path string
	Status       uint16
	// Description is FMC's own message, from its error envelope.
	Description string
}

func (e *APIError) Error() string {
	if e.Description == "" {
		return fmt.Sprintf("FMC answered %s %s with HTTP %d", e.Method, e.Path, e.Status)
	}
	return fmt.Sprintf("FMC answered %s %s with HTTP %d: %s", e.Method, e.Path, e.Status, e.Description)
}

// Permanent says whether sending the same request again cannot help: FMC
// refused its content. Authentication, rate limits and server trouble pass.
func (e *APIError) Permanent() bool {
	switch e.Status {
	case 400, 404, 405, 409, 413, 422:
		// FMC answers 400 "... please try again" when a service is
		// briefly unavailable.
		return !strings.Contains(strings.ToLower(e.Description), "try again")
	}
	return false
}

// RateLimited is a 429 that lasted longer than the plugin waits inside a
// call.
type RateLimited struct {
	Method, Path string
	// After is when FMC says to come back (Retry-After), or the configured
	// delay when it did not say.
	After time.Duration
}

func (e *RateLimited) Error() string {
	return fmt.Sprintf("FMC rate limit (HTTP 429) on %s %s; again in %s", e.Method, e.Path, e.After)
}

// OutOfRequests is the host's refusal of a request past the call's share
// (`max_requests_per_call`): the rest goes in a later call.
type OutOfRequests struct{ Reason string }

func (e *OutOfRequests) Error() string { return e.Reason }

// HostRefused is a request the host would not make: its allowlist denies
// it, or it is malformed. No retry helps until the operator changes the
// plugin's configuration or the host's.
type HostRefused struct{ Reason string }

func (e *HostRefused) Error() string { return e.Reason }

// maxRetryAfter is the longest Retry-After taken: a day. More would not fit
// a time.Duration for long, and the host's retries end at their max_age.
const maxRetryAfter = 24 * time.Hour

type api struct {
	cfg    *Config
	host   Host
	domain string
	// ids of objects by name, from kv or FMC.
	ids map[string]string
	// Requests counts the HTTP requests made, for the summary.
	Requests int
	// patient waits out every 429 inside the call (see reconcileWait).
	patient bool
	// slept is how long this call has waited out 429s, shared by the apis
	// of one call: what a call may wait in all is cfg.RateLimitWait, which
	// its deadline must hold.
	slept *time.Duration
}

// A paged reconcile waits out FMC's rate limit, however often it answers
// 429, for up to this much at a time (FMC counts requests by the minute).
// Its deadline grows by the plugin's deadline with every page of the
// inventory, and one that gives up starts over from nothing on its retry,
// where the requests it had made count against the next minute all the
// same: at 200,000 VMs a reconcile reads some 400 pages of mappings, more
// than FMC's 120 (or 300) requests a minute.
const reconcileWait = 60 * time.Second

// reconcileWaits bounds the 429s in a row on one request a reconcile
// waits out.
const reconcileWaits = 10

func newAPI(cfg *Config, host Host) *api {
	return &api{cfg: cfg, host: host, ids: map[string]string{}, slept: new(time.Duration)}
}

var uuidPattern = regexp.MustCompile(`^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$`)

// do sends one request. A 429 is waited out inside the call, twice at most,
// while the call's waits come to at most cfg.RateLimitWait in all (in a paged reconcile, for
// at most reconcileWait, reconcileWaits times); otherwise it is a
// *RateLimited for the caller to turn into a retry.
func (a *api) do(method, path string, body any, wantStatus ...uint16) ([]byte, error) {
	var payload []byte
	if body != nil {
		var err error
		if payload, err = json.Marshal(body); err != nil {
			return nil, fmt.Errorf("encoding %s %s: %v", method, path, err)
		}
	}
	request := Request{
		Method:  method,
		URL:     a.cfg.Base + path,
		Headers: [][2]string{{"Accept", "application/json"}},
		Body:    payload,
	}
	if payload != nil {
		request.Headers = append(request.Headers, [2]string{"Content-Type", "application/json"})
	}
	for waited := 0; ; waited++ {
		a.Requests++
		response, err := a.host.Send(request)
		if err != nil {
			return nil, fmt.Errorf("%s %s: %w", method, path, err)
		}
		for _, want := range wantStatus {
			if response.Status == want {
				return response.Body, nil
			}
		}
		if response.Status == 429 {
			after := a.cfg.RateLimitDelay
			if value, ok := response.Header("Retry-After"); ok {
				if secs, err := strconv.ParseFloat(strings.TrimSpace(value), 64); err == nil && secs >= 0 {
					after = time.Duration(math.Min(secs, maxRetryAfter.Seconds()) * float64(time.Second))
				}
			}
			// Twice at most per request: a `Retry-After: 0` must not loop.
			if waited < 2 && *a.slept+after <= a.cfg.RateLimitWait {
				a.host.Log(Debug, fmt.Sprintf("FMC rate limit on %s %s: waiting %s", method, path, after))
				a.host.Sleep(after)
				*a.slept += after
				continue
			}
			if a.patient && waited < reconcileWaits && after <= reconcileWait {
				a.host.Log(Info, fmt.Sprintf("FMC rate limit on %s %s: the reconcile waits %s", method, path, after))
				a.host.Sleep(after)
				continue
			}
			return nil, &RateLimited{Method: method, Path: path, After: after}
		}
		return nil, &APIError{Method: method, Path: path, Status: response.Status, Description: description(response.Body)}
	}
}

// description is messages[0].description of FMC's error envelope
// `{"error":{"category":..,"messages":[{"description":..}],"severity":..}}`,
// or the start of a body that is not one.
func description(body []byte) string {
	var envelope struct {
		Error struct {
			Messages []struct {
				Description string `json:"description"`
			} `json:"messages"`
		} `json:"error"`
	}
	if json.Unmarshal(body, &envelope) == nil {
		var texts []string
		for _, m := range envelope.Error.Messages {
			if m.Description != "" {
				texts = append(texts, m.Description)
			}
		}
		if len(texts) > 0 {
			return strings.Join(texts, "; ")
		}
	}
	text := strings.TrimSpace(string(body))
	if len(text) > 200 {
		text = text[:200] + "…"
	}
	return text
}

// Domain returns the configured domain's UUID: as given, or looked up by
// name once and remembered in kv.
func (a *api) Domain() (string, error) {
	if a.domain != "" {
		return a.domain, nil
	}
	if uuidPattern.MatchString(a.cfg.Domain) {
		a.domain = a.cfg.Domain
		return a.domain, nil
	}
	var cached struct{ Name, UUID string }
	if err := load(a.host, domainKey, &cached); err != nil {
		return "", err
	}
	if cached.Name == a.cfg.Domain && cached.UUID != "" {
		a.domain = cached.UUID
		return a.domain, nil
	}
	body, err := a.do("GET", "/api/fmc_platform/v1/info/domain?limit=1000", nil, 200)
	if err != nil {
		return "", fmt.Errorf("looking up domain %q: %w", a.cfg.Domain, err)
	}
	var list struct {
		Items []struct {
			UUID string `json:"uuid"`
			Name string `json:"name"`
		} `json:"items"`
	}
	if err := json.Unmarshal(body, &list); err != nil {
		return "", fmt.Errorf("reading FMC's domain list: %v", err)
	}
	var names []string
	for _, d := range list.Items {
		if strings.EqualFold(d.Name, a.cfg.Domain) {
			a.domain = d.UUID
			cached.Name, cached.UUID = a.cfg.Domain, d.UUID
			return a.domain, write(a.host, domainKey, cached, false)
		}
		names = append(names, d.Name)
	}
	return "", &APIError{Method: "GET", Path: "/api/fmc_platform/v1/info/domain", Status: 404,
		Description: fmt.Sprintf("no domain named %q (FMC has: %s)", a.cfg.Domain, strings.Join(names, ", "))}
}

func (a *api) objectsPath() (string, error) {
	domain, err := a.Domain()
	if err != nil {
		return "", err
	}
	return "/api/fmc_config/v1/domain/" + url.PathEscape(domain) + "/object/dynamicobjects", nil
}

type object struct {
	ID          string `json:"id,omitempty"`
	Name        string `json:"name"`
	Type        string `json:"type"`
	ObjectType  string `json:"objectType,omitempty"`
	Description string `json:"description,omitempty"`
}

type paging struct {
	Offset int `json:"offset"`
	Limit  int `json:"limit"`
	Count  int `json:"count"`
	Pages  int `json:"pages"`
}

// pages GETs every page of a list (FMC pages at most 1,000 items) and hands
// each page's items to each.
func (a *api) pages(path string, each func(items json.RawMessage) (int, error)) error {
	sep := "?"
	if strings.Contains(path, "?") {
		sep = "&"
	}
	for offset := 0; ; {
		body, err := a.do("GET", fmt.Sprintf("%s%soffset=%d&limit=%d", path, sep, offset, pageLimit), nil, 200)
		if err != nil {
			return err
		}
		var page struct {
			Items  json.RawMessage `json:"items"`
			Paging paging          `json:"paging"`
		}
		if err := json.Unmarshal(body, &page); err != nil {
			return fmt.Errorf("reading FMC's answer to GET %s: %v", path, err)
		}
		n := 0
		if len(page.Items) > 0 {
			if n, err = each(page.Items); err != nil {
				return fmt.Errorf("reading FMC's answer to GET %s: %v", path, err)
			}
		}
		offset += n
		if n == 0 || offset >= page.Paging.Count {
			return nil
		}
	}
}

// ID returns the id of the object named name: remembered, or looked up.
// "" when FMC has no such object.
func (a *api) ID(name string) (string, error) {
	if id, ok := a.ids[name]; ok {
		return id, nil
	}
	var id string
	if err := load(a.host, objPrefix+name, &id); err != nil {
		return "", err
	}
	if id != "" {
		a.ids[name] = id
		return id, nil
	}
	base, err := a.objectsPath()
	if err != nil {
		return "", err
	}
	body, err := a.do("GET", base+"?name="+url.QueryEscape(name), nil, 200)
	if err != nil {
		return "", err
	}
	var list struct {
		Items []object `json:"items"`
	}
	if err := json.Unmarshal(body, &list); err != nil {
		return "", fmt.Errorf("reading FMC's answer for object %q: %v", name, err)
	}
	for _, o := range list.Items {
		if o.Name == name {
			return o.ID, a.remember(name, o.ID)
		}
	}
	return "", nil
}

func (a *api) remember(name, id string) error {
	a.ids[name] = id
	return write(a.host, objPrefix+name, id, false)
}

// forget drops a remembered id that FMC no longer knows.
func (a *api) forget(name string) error {
	delete(a.ids, name)
	return write(a.host, objPrefix+name, nil, true)
}

// Ensure makes sure every named object exists, creating the missing ones in
// one bulk request.
func (a *api) Ensure(names []string) error {
	var missing []object
	for _, name := range names {
		id, err := a.ID(name)
		if err != nil {
			return err
		}
		if id == "" {
			missing = append(missing, object{Name: name, Type: "DynamicObject", ObjectType: "IP", Description: a.cfg.Description})
		}
	}
	if len(missing) == 0 {
		return nil
	}
	base, err := a.objectsPath()
	if err != nil {
		return err
	}
	body, err := a.do("POST", base+"?bulk=true", missing, 201, 200)
	var refused *APIError
	if errors.As(err, &refused) && refused.Status == 400 && isDuplicate(refused.Description) {
		// Another host (or an earlier call whose records were lost) made
		// one of them first: look each up, create what is still missing.
		for _, o := range missing {
			delete(a.ids, o.Name)
			if id, err := a.ID(o.Name); err != nil {
				return err
			} else if id == "" {
				if err := a.create(base, o); err != nil {
					return err
				}
			}
		}
		return nil
	}
	if err != nil {
		return err
	}
	var created struct {
		Items []object `json:"items"`
	}
	if err := json.Unmarshal(body, &created); err != nil {
		return fmt.Errorf("reading FMC's answer to creating objects: %v", err)
	}
	for _, o := range created.Items {
		if err := a.remember(o.Name, o.ID); err != nil {
			return err
		}
	}
	for _, o := range missing {
		if _, ok := a.ids[o.Name]; !ok {
			return fmt.Errorf("FMC created objects but did not return %q", o.Name)
		}
	}
	a.host.Log(Info, fmt.Sprintf("created %d dynamic objects: %s", len(missing), namesOf(missing)))
	return nil
}

func (a *api) create(base string, o object) error {
	body, err := a.do("POST", base, o, 201, 200)
	if err != nil {
		return err
	}
	var created object
	if err := json.Unmarshal(body, &created); err != nil || created.ID == "" {
		return fmt.Errorf("reading FMC's answer to creating %q: no id", o.Name)
	}
	return a.remember(created.Name, created.ID)
}

func isDuplicate(description string) bool {
	d := strings.ToLower(description)
	return strings.Contains(d, "duplicate") || strings.Contains(d, "already exists")
}

func namesOf(objects []object) string {
	names := make([]string, len(objects))
	for i, o := range objects {
		names[i] = o.Name
	}
	return strings.Join(names, ", ")
}

// Owned lists the objects whose names start with the plugin's prefix.
func (a *api) Owned() (map[string]string, error) {
	base, err := a.objectsPath()
	if err != nil {
		return nil, err
	}
	owned := map[string]string{}
	err = a.pages(base+"?expanded=true&filter="+url.QueryEscape("nameStartsWith:"+a.cfg.TagPrefix+"."), func(raw json.RawMessage) (int, error) {
		var items []object
		if err := json.Unmarshal(raw, &items); err != nil {
			return 0, err
		}
		for _, o := range items {
			// The filter is FMC's; ownership is decided here.
			if a.cfg.owns(o.Name) {
				owned[o.Name] = o.ID
			}
		}
		return len(items), nil
	})
	if err != nil {
		return nil, err
	}
	// Bring the remembered ids in line: an object deleted and made again
	// by hand has a new id, one deleted for good has none.
	remembered, err := a.host.KvList(objPrefix)
	if err != nil {
		return nil, fmt.Errorf("listing kv `%s`: %v", objPrefix, err)
	}
	for _, key := range remembered {
		name := strings.TrimPrefix(key, objPrefix)
		if _, ok := owned[name]; !ok {
			if err := a.forget(name); err != nil {
				return nil, err
			}
		}
	}
	for _, name := range sortedNames(owned) {
		var id string
		if err := load(a.host, objPrefix+name, &id); err != nil {
			return nil, err
		}
		if id != owned[name] {
			if err := a.remember(name, owned[name]); err != nil {
				return nil, err
			}
		}
		a.ids[name] = owned[name]
	}
	return owned, nil
}

// Mappings reads an object's addresses, canonical.
func (a *api) Mappings(id string) (map[string]bool, error) {
	ips := map[string]bool{}
	err := a.eachMapping(id, func(ip string) error {
		ips[ip] = true
		return nil
	})
	return ips, err
}

// eachMapping hands each of an object's addresses to each, canonical, a
// page of FMC's answer at a time.
func (a *api) eachMapping(id string, each func(ip string) error) error {
	base, err := a.objectsPath()
	if err != nil {
		return err
	}
	// pages reports what its callback returns as a fault of FMC's answer;
	// each's own errors (kv) are not, so they come back apart.
	var failed error
	err = a.pages(base+"/"+url.PathEscape(id)+"/mappings", func(raw json.RawMessage) (int, error) {
		var items []struct {
			Mapping string `json:"mapping"`
		}
		if err := json.Unmarshal(raw, &items); err != nil {
			return 0, err
		}
		for _, m := range items {
			ip, ok := CanonicalIP(m.Mapping)
			if !ok {
				// A network someone mapped by hand: kept as FMC says it,
				// so that reconcile removes it from an owned object.
				ip = m.Mapping
			}
			if failed = each(ip); failed != nil {
				return 0, failed
			}
		}
		return len(items), nil
	})
	if failed != nil {
		return failed
	}
	return err
}

type objectRef struct {
	ID   string `json:"id,omitempty"`
	Name string `json:"name,omitempty"`
	Type string `json:"type"`
}

type mappingEntry struct {
	Mappings      []string  `json:"mappings"`
	DynamicObject objectRef `json:"dynamicObject"`
}

type mappingsBody struct {
	Add    []mappingEntry `json:"add"`
	Remove []mappingEntry `json:"remove"`
}

// Apply adds and removes addresses in bulk, as few requests as FMC's body
// limit allows. Every object to add to must exist (Ensure); removals from an
// object FMC no longer has are dropped, as there is nothing to remove.
func (a *api) Apply(add, remove map[string][]string) error {
	base, err := a.objectsPath()
	if err != nil {
		return err
	}
	path := strings.TrimSuffix(base, "/dynamicobjects") + "/dynamicobjectmappings"
	var chunks []mappingsBody
	current, size := mappingsBody{}, 32
	flush := func() {
		if len(current.Add)+len(current.Remove) > 0 {
			chunks = append(chunks, current)
		}
		current, size = mappingsBody{}, 32
	}
	for _, side := range []struct {
		lists  map[string][]string
		adding bool
	}{{remove, false}, {add, true}} {
		for _, name := range sortedNames(side.lists) {
			id, err := a.ID(name)
			if err != nil {
				return err
			}
			if id == "" {
				if side.adding {
					return fmt.Errorf("dynamic object %q does not exist", name)
				}
				continue
			}
			ips := side.lists[name]
			for len(ips) > 0 {
				entry := mappingEntry{DynamicObject: objectRef{ID: id, Type: "DynamicObject"}}
				cost := 64 + len(id)
				for len(ips) > 0 && size+cost+len(ips[0])+3 <= a.cfg.MaxRequestBytes {
					cost += len(ips[0]) + 3
					entry.Mappings = append(entry.Mappings, ips[0])
					ips = ips[1:]
				}
				if len(entry.Mappings) == 0 {
					flush()
					continue
				}
				if side.adding {
					current.Add = append(current.Add, entry)
				} else {
					current.Remove = append(current.Remove, entry)
				}
				size += cost
			}
		}
	}
	flush()
	for _, chunk := range chunks {
		if chunk.Add == nil {
			chunk.Add = []mappingEntry{}
		}
		if chunk.Remove == nil {
			chunk.Remove = []mappingEntry{}
		}
		if _, err := a.do("POST", path, chunk, 201, 200); err != nil {
			return err
		}
	}
	return nil
}

func sortedNames[V any](m map[string]V) []string {
	names := make([]string, 0, len(m))
	for n := range m {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}
