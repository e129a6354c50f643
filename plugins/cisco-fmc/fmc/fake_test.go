package fmc

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"
)

// fakeFMC is an in-memory FMC speaking the wire format the plugin uses,
// as an http.Handler the fake host calls directly. The end-to-end tests in
// tests/all run the real component against the simulator instead.
type fakeFMC struct {
	t       testing.TB
	domains map[string]string // name -> uuid
	objects map[string]string // name -> id
	maps    map[string]map[string]bool
	nextID  int
	// throttle answers the next N requests with 429 and this Retry-After.
	throttle   int
	retryAfter string
	// refuse answers bulk mapping posts that mention this address with 400.
	refuse   string
	requests []string
	// mappingBodies is the size of every bulk mapping request's body.
	mappingBodies []int
	// ignoreFilter lists every object whatever `filter` asks, so that what
	// the plugin owns is decided by the plugin alone.
	ignoreFilter bool
}

func newFake(t testing.TB) *fakeFMC {
	return &fakeFMC{t: t, domains: map[string]string{"Global": "e276abec-e0f2-11e3-8169-6d9ed49b625f"},
		objects: map[string]string{}, maps: map[string]map[string]bool{}}
}

const domainPath = "/api/fmc_config/v1/domain/e276abec-e0f2-11e3-8169-6d9ed49b625f/object/"

func envelope(w http.ResponseWriter, status int, text string) {
	w.WriteHeader(status)
	fmt.Fprintf(w, `{"error":{"category":"FRAMEWORK","messages":[{"description":%q}],"severity":"ERROR"}}`, text)
}

func (f *fakeFMC) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	f.requests = append(f.requests, r.Method+" "+r.URL.RequestURI())
	if f.throttle > 0 {
		f.throttle--
		if f.retryAfter != "" {
			w.Header().Set("Retry-After", f.retryAfter)
		}
		envelope(w, 429, "Too Many Requests")
		return
	}
	body, _ := io.ReadAll(r.Body)
	q := r.URL.Query()
	path := r.URL.Path
	switch {
	case r.Method == "GET" && path == "/api/fmc_platform/v1/info/domain":
		var items []map[string]string
		for name, id := range f.domains {
			items = append(items, map[string]string{"name": name, "uuid": id, "type": "Domain"})
		}
		json.NewEncoder(w).Encode(map[string]any{"items": items, "paging": map[string]int{"count": len(items)}})
	case path == domainPath+"dynamicobjects" && r.Method == "GET":
		var names []string
		for name := range f.objects {
			if n := q.Get("name"); n != "" && n != name {
				continue
			}
			if p, ok := strings.CutPrefix(q.Get("filter"), "nameStartsWith:"); ok && !f.ignoreFilter && !strings.HasPrefix(name, p) {
				continue
			}
			names = append(names, name)
		}
		sort.Strings(names)
		f.page(w, q, len(names), func(i int) any {
			return map[string]string{"id": f.objects[names[i]], "name": names[i], "type": "DynamicObject"}
		})
	case path == domainPath+"dynamicobjects" && r.Method == "POST" && q.Get("bulk") == "true":
		var objects []object
		if err := json.Unmarshal(body, &objects); err != nil {
			envelope(w, 422, "Unprocessable Entity")
			return
		}
		var items []object
		for _, o := range objects {
			if _, dup := f.objects[o.Name]; dup {
				envelope(w, 400, "Duplicate Name: "+o.Name)
				return
			}
			if o.Type != "DynamicObject" || o.ObjectType != "IP" {
				envelope(w, 400, "bad type")
				return
			}
		}
		for _, o := range objects {
			f.nextID++
			o.ID = fmt.Sprintf("005056AB-0000-0ed3-0000-%012d", f.nextID)
			f.objects[o.Name] = o.ID
			f.maps[o.ID] = map[string]bool{}
			items = append(items, o)
		}
		w.WriteHeader(201)
		json.NewEncoder(w).Encode(map[string]any{"items": items})
	case strings.HasPrefix(path, domainPath+"dynamicobjects/") && strings.HasSuffix(path, "/mappings") && r.Method == "GET":
		id := strings.TrimSuffix(strings.TrimPrefix(path, domainPath+"dynamicobjects/"), "/mappings")
		set, ok := f.maps[id]
		if !ok {
			envelope(w, 404, "Resource not found")
			return
		}
		ips := sortedKeys(set)
		f.page(w, q, len(ips), func(i int) any { return map[string]string{"mapping": ips[i]} })
	case path == domainPath+"dynamicobjectmappings" && r.Method == "POST":
		f.mappingBodies = append(f.mappingBodies, len(body))
		var bulk mappingsBody
		if err := json.Unmarshal(body, &bulk); err != nil {
			envelope(w, 422, "Unprocessable Entity")
			return
		}
		for _, e := range append(append([]mappingEntry{}, bulk.Add...), bulk.Remove...) {
			if _, ok := f.maps[e.DynamicObject.ID]; !ok {
				envelope(w, 400, "Invalid dynamic object "+e.DynamicObject.ID)
				return
			}
			for _, ip := range e.Mappings {
				if f.refuse != "" && ip == f.refuse {
					envelope(w, 400, "Invalid mapping "+ip)
					return
				}
			}
		}
		for _, e := range bulk.Remove {
			for _, ip := range e.Mappings {
				delete(f.maps[e.DynamicObject.ID], ip)
			}
		}
		for _, e := range bulk.Add {
			for _, ip := range e.Mappings {
				f.maps[e.DynamicObject.ID][ip] = true
			}
		}
		w.WriteHeader(201)
		w.Write(body)
	default:
		envelope(w, 404, "no route "+r.Method+" "+path)
	}
}

func (f *fakeFMC) page(w http.ResponseWriter, q map[string][]string, count int, item func(int) any) {
	offset, _ := strconv.Atoi(first(q["offset"]))
	limit, err := strconv.Atoi(first(q["limit"]))
	if err != nil {
		limit = 25
	}
	items := []any{}
	for i := offset; i < count && i < offset+limit; i++ {
		items = append(items, item(i))
	}
	json.NewEncoder(w).Encode(map[string]any{"items": items,
		"paging": map[string]int{"offset": offset, "limit": limit, "count": count}})
}

func first(v []string) string {
	if len(v) == 0 {
		return ""
	}
	return v[0]
}

// mappings is object name -> sorted addresses, as the simulator's
// /_sim/mappings.
func (f *fakeFMC) mappings() map[string][]string {
	out := map[string][]string{}
	for name, id := range f.objects {
		out[name] = sortedKeys(f.maps[id])
	}
	return out
}

// fakeHost is the host: kv in a map, HTTP to the fake FMC.
type fakeHost struct {
	fmc      *fakeFMC
	kv       map[string][]byte
	logs     []string
	slept    []time.Duration
	clusters map[string]string
	// writes counts KvSet and KvDelete calls, keyPages KvListAfter calls.
	writes, keyPages int
	// requestsLeft, when set, is how many more requests the host makes
	// before it refuses them as over the call's share; overShare counts
	// those refused.
	requestsLeft *int
	overShare    int
}

func newHost(t testing.TB) *fakeHost {
	return &fakeHost{fmc: newFake(t), kv: map[string][]byte{}, clusters: map[string]string{}}
}

func (h *fakeHost) Send(r Request) (Response, error) {
	if !strings.HasPrefix(r.URL, "https://fmc.test/") {
		return Response{}, &HostRefused{Reason: "denied by the host's allowlist: " + r.URL}
	}
	if h.requestsLeft != nil {
		if *h.requestsLeft == 0 {
			h.overShare++
			return Response{}, &OutOfRequests{Reason: "limit exceeded: at most N requests per call"}
		}
		*h.requestsLeft--
	}
	req := httptest.NewRequest(r.Method, strings.TrimPrefix(r.URL, "https://fmc.test"), strings.NewReader(string(r.Body)))
	rec := httptest.NewRecorder()
	h.fmc.ServeHTTP(rec, req)
	resp := Response{Status: uint16(rec.Code), Body: rec.Body.Bytes()}
	for name, values := range rec.Header() {
		for _, v := range values {
			resp.Headers = append(resp.Headers, [2]string{name, v})
		}
	}
	return resp, nil
}

func (h *fakeHost) KvGet(key string) ([]byte, bool, error) {
	v, ok := h.kv[key]
	return v, ok, nil
}
func (h *fakeHost) KvSet(key string, value []byte) error {
	h.writes++
	h.kv[key] = value
	return nil
}
func (h *fakeHost) KvDelete(key string) error {
	h.writes++
	delete(h.kv, key)
	return nil
}
func (h *fakeHost) KvList(prefix string) ([]string, error) {
	var keys []string
	for k := range h.kv {
		if strings.HasPrefix(k, prefix) {
			keys = append(keys, k)
		}
	}
	sort.Strings(keys)
	return keys, nil
}
func (h *fakeHost) KvListAfter(prefix, after string, limit uint32) ([]string, error) {
	h.keyPages++
	all, _ := h.KvList(prefix)
	from := sort.SearchStrings(all, after)
	if from < len(all) && all[from] == after {
		from++
	}
	return all[from:min(len(all), from+int(limit))], nil
}
func (h *fakeHost) Log(level Level, message string) { h.logs = append(h.logs, message) }
func (h *fakeHost) VmClusterName(uuid string) (string, bool) {
	name, ok := h.clusters[uuid]
	return name, ok
}
func (h *fakeHost) Sleep(d time.Duration) { h.slept = append(h.slept, d) }
