package fmc

import (
	"fmt"
	"testing"
	"time"
)

// The plugin's logic natively, for BENCHMARKS.md's "Languages": batches
// of distinct VMs as the lifecycle bench hands the component (vm_on.json
// with category F5Pool=web: one NIC, one address), VM.ON and then VM.OFF,
// against the in-memory host and FMC of the tests. What it leaves out
// against the component's figures is the host's kv (redb) and HTTP to the
// FMC simulator; the fake FMC's own JSON decoding is in.
//
//	cargo xtask go-bench cisco-fmc
func BenchmarkHandle(b *testing.B) {
	for _, size := range []int{10, 256} {
		for _, kind := range []string{"VM.ON", "VM.OFF"} {
			b.Run(fmt.Sprintf("%d/%s", size, kind), func(b *testing.B) {
				c, err := ParseConfig(`{"fmc": "https://fmc.test"}`)
				if err != nil {
					b.Fatal(err)
				}
				h := newHost(b)
				var spent time.Duration
				for round := 0; round < b.N; round++ {
					on, off := make([]Event, size), make([]Event, size)
					for i := range on {
						uuid := fmt.Sprintf("%08d-0000-4000-8000-%012d", round, i)
						ip := fmt.Sprintf("10.%d.%d.%d", round%200, i/250, i%250+1)
						v := vm(uuid, "ON", map[string]string{"F5Pool": "web"}, ip)
						on[i] = event("VM.ON", uuid, v)
						offVM := *v
						offVM.PowerState = "OFF"
						off[i] = event("VM.OFF", uuid, &offVM)
					}
					if kind == "VM.OFF" {
						allDone(b, Handle(c, h, on))
					}
					batch := on
					if kind == "VM.OFF" {
						batch = off
					}
					started := time.Now()
					out := Handle(c, h, batch)
					spent += time.Since(started)
					allDone(b, out)
					if kind == "VM.ON" {
						allDone(b, Handle(c, h, off))
					}
				}
				b.ReportMetric(float64(spent.Nanoseconds())/float64(b.N*size)/1e3, "µs/event")
			})
		}
	}
}
