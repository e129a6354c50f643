package fmc

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/url"
	"strings"
	"time"
)

// DefaultSubscriptions are the event types the plugin acts on.
var DefaultSubscriptions = []string{
	"VM.CREATE", "VM.ON", "VM.OFF", "VM.UPDATE", "VM.MIGRATE",
	"VM.NIC_PLUG", "VM.NIC_UNPLUG", "VM.DELETE",
}

// The FMC's request body limit is 2,048,000 bytes; the default leaves room.
const (
	defaultMaxRequestBytes = 2_000_000
	fmcMaxRequestBytes     = 2_048_000
	// FMC answers at most 1,000 items a page.
	pageLimit = 1000
)

// settings is the operator's JSON, as written.
type settings struct {
	FMC             string    `json:"fmc"`
	Domain          *string   `json:"domain"`
	TagPrefix       *string   `json:"tag_prefix"`
	StaticTag       *string   `json:"static_tag"`
	CategoryTag     *string   `json:"category_tag"`
	Categories      *[]string `json:"categories"`
	Description     *string   `json:"description"`
	MaxRequestBytes *int      `json:"max_request_bytes"`
	RateLimitWait   *float64  `json:"rate_limit_wait"`
	RateLimitDelay  *float64  `json:"rate_limit_delay"`
	Subscriptions   *[]string `json:"subscriptions"`
}

// Config is the plugin's checked configuration.
type Config struct {
	// Base is the FMC's base URL, without a trailing slash.
	Base string
	// Domain is a domain UUID, or a domain name ("Global", "Global/East")
	// that the plugin looks up.
	Domain      string
	TagPrefix   string
	StaticTag   string // "" for none
	CategoryTag Template
	// Categories limits which category keys make objects; nil for all.
	Categories      map[string]bool
	Description     string
	MaxRequestBytes int
	// RateLimitWait: a 429 whose Retry-After is at most this is waited out
	// inside the call; a longer one ends the call with a retry.
	RateLimitWait time.Duration
	// RateLimitDelay: the retry delay after a 429 without Retry-After.
	RateLimitDelay time.Duration
	Subscriptions  []string
}

// ParseConfig reads and checks the operator's settings (a JSON object).
// Unknown keys are refused, so a typo is an error and not a default.
func ParseConfig(text string) (*Config, error) {
	var s settings
	decoder := json.NewDecoder(bytes.NewReader([]byte(text)))
	decoder.DisallowUnknownFields()
	if err := decoder.Decode(&s); err != nil {
		return nil, fmt.Errorf("configuration: %v", err)
	}
	if decoder.More() {
		return nil, fmt.Errorf("configuration: more than one JSON value")
	}
	c := &Config{
		Domain:          "Global",
		TagPrefix:       "ntnx",
		Description:     "Managed by prismhook (cisco-fmc): Nutanix VM addresses",
		MaxRequestBytes: defaultMaxRequestBytes,
		RateLimitWait:   2 * time.Second,
		RateLimitDelay:  30 * time.Second,
		Subscriptions:   DefaultSubscriptions,
	}
	if s.FMC == "" {
		return nil, fmt.Errorf("configuration: `fmc` (the FMC's base URL, https://fmc.example.com) is required")
	}
	base, err := url.Parse(s.FMC)
	if err != nil || (base.Scheme != "https" && base.Scheme != "http") || base.Host == "" {
		return nil, fmt.Errorf("configuration: `fmc` must be an http(s) URL, not %q", s.FMC)
	}
	if base.User != nil || base.RawQuery != "" || base.Fragment != "" {
		return nil, fmt.Errorf("configuration: `fmc` must be a bare base URL: no credentials, query or fragment")
	}
	c.Base = strings.TrimRight(base.String(), "/")
	if s.Domain != nil {
		if strings.TrimSpace(*s.Domain) == "" {
			return nil, fmt.Errorf("configuration: `domain` is empty")
		}
		c.Domain = *s.Domain
	}
	if s.TagPrefix != nil {
		c.TagPrefix = *s.TagPrefix
	}
	if c.TagPrefix == "" || !validName(c.TagPrefix) {
		return nil, fmt.Errorf("configuration: `tag_prefix` %q must be non-empty and hold only letters, digits, `.`, `_`, `+`, `-`", c.TagPrefix)
	}
	if len(c.TagPrefix) > MaxPrefixLen {
		return nil, fmt.Errorf("configuration: `tag_prefix` is %d characters; at most %d, so that an object name cut to FMC's %d still starts with it", len(c.TagPrefix), MaxPrefixLen, MaxNameLen)
	}
	prefixTemplate := "{prefix}.managed"
	if s.StaticTag != nil {
		prefixTemplate = *s.StaticTag
	}
	if prefixTemplate != "" {
		static, err := ParseTemplate(prefixTemplate)
		if err != nil {
			return nil, fmt.Errorf("configuration: `static_tag`: %v", err)
		}
		if static.UsesVmFields() {
			return nil, fmt.Errorf("configuration: `static_tag` may use only {prefix}")
		}
		c.StaticTag = static.Render(c.TagPrefix, "", "", "", "")
		if !c.owns(c.StaticTag) {
			return nil, fmt.Errorf("configuration: `static_tag` %q must start with `%s.`, so that the plugin knows it owns it", c.StaticTag, c.TagPrefix)
		}
		if len(c.StaticTag) > MaxNameLen {
			return nil, fmt.Errorf("configuration: `static_tag` %q is %d characters; FMC's object names hold at most %d", c.StaticTag, len(c.StaticTag), MaxNameLen)
		}
	}
	categoryTemplate := "{prefix}.{key}.{value}"
	if s.CategoryTag != nil {
		categoryTemplate = *s.CategoryTag
	}
	c.CategoryTag, err = ParseTemplate(categoryTemplate)
	if err != nil {
		return nil, fmt.Errorf("configuration: `category_tag`: %v", err)
	}
	if !strings.HasPrefix(categoryTemplate, "{prefix}.") && !strings.HasPrefix(categoryTemplate, c.TagPrefix+".") {
		return nil, fmt.Errorf("configuration: `category_tag` must start with `{prefix}.`, so that the plugin knows it owns what it names")
	}
	if s.Categories != nil {
		c.Categories = map[string]bool{}
		for _, key := range *s.Categories {
			c.Categories[key] = true
		}
	}
	if s.Description != nil {
		if len(*s.Description) > 255 {
			return nil, fmt.Errorf("configuration: `description` is longer than FMC's 255 characters")
		}
		c.Description = *s.Description
	}
	if s.MaxRequestBytes != nil {
		if *s.MaxRequestBytes < 4096 || *s.MaxRequestBytes > fmcMaxRequestBytes {
			return nil, fmt.Errorf("configuration: `max_request_bytes` must be between 4096 and %d (FMC's limit)", fmcMaxRequestBytes)
		}
		c.MaxRequestBytes = *s.MaxRequestBytes
	}
	if s.RateLimitWait != nil {
		if *s.RateLimitWait < 0 || *s.RateLimitWait > 60 {
			return nil, fmt.Errorf("configuration: `rate_limit_wait` must be between 0 and 60 seconds")
		}
		c.RateLimitWait = seconds(*s.RateLimitWait)
	}
	if s.RateLimitDelay != nil {
		if *s.RateLimitDelay <= 0 || *s.RateLimitDelay > 3600 {
			return nil, fmt.Errorf("configuration: `rate_limit_delay` must be above 0 and at most 3600 seconds")
		}
		c.RateLimitDelay = seconds(*s.RateLimitDelay)
	}
	if s.Subscriptions != nil {
		if len(*s.Subscriptions) == 0 {
			return nil, fmt.Errorf("configuration: `subscriptions` is empty")
		}
		c.Subscriptions = *s.Subscriptions
	}
	return c, nil
}

func seconds(s float64) time.Duration {
	return time.Duration(s * float64(time.Second))
}

// owns says whether an object name is the plugin's: it starts with the
// prefix and a dot. Nothing else is ever changed.
func (c *Config) owns(name string) bool {
	return strings.HasPrefix(name, c.TagPrefix+".")
}
