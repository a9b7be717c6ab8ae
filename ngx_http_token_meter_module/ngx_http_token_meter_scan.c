
/*
 * Copyright (C) The ngx_http_token_meter_module authors
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <jansson.h>

#include "ngx_http_token_meter_scan.h"


#define NGX_HTTP_TOKEN_METER_MAX_TOKENS  1000000000LL


enum {
    sw_value = 0,
    sw_string,
    sw_escape,
    sw_unicode
};


enum {
    sw_line_start = 0,
    sw_field,
    sw_value_start,
    sw_data,
    sw_skip
};


static void ngx_http_token_meter_json_char(
    ngx_http_token_meter_json_scan_t *s, u_char ch);
static ngx_uint_t ngx_http_token_meter_sse_data(
    ngx_http_token_meter_sse_scan_t *s);
static void ngx_http_token_meter_sse_event_name(
    ngx_http_token_meter_sse_scan_t *s);
static ngx_uint_t ngx_http_token_meter_key_is(
    ngx_http_token_meter_json_scan_t *s, u_char *key, size_t len,
    char *name);
static int64_t *ngx_http_token_meter_usage_count(
    ngx_http_token_meter_usage_t *usage, u_char *key, size_t len,
    ngx_uint_t depth, ngx_uint_t in_details, int64_t *hits);
static void ngx_http_token_meter_estimate(json_t *value,
    ngx_http_token_meter_text_t *text, ngx_uint_t depth);


/* the request fields whose text is sent to the model */

static char  *ngx_http_token_meter_input_fields[] = {
    "messages",
    "prompt",
    "input",
    "instructions",
    "system",
    "tools",
    "functions",
    NULL
};


/* the fields whose string values are generated text */

static char  *ngx_http_token_meter_text_fields[] = {
    "content",
    "text",
    "delta",
    "arguments",
    "refusal",
    "reasoning_content",
    NULL
};


void
ngx_http_token_meter_json_scan_init(ngx_http_token_meter_json_scan_t *s)
{
    ngx_memzero(s, offsetof(ngx_http_token_meter_json_scan_t, usage));
}


void
ngx_http_token_meter_json_scan(ngx_http_token_meter_json_scan_t *s,
    u_char *p, u_char *last)
{
    u_char  *q;

    while (p < last) {

        /*
         * most of a document is the contents of strings that are neither
         * keys nor kept: they are skipped, or counted, in one go
         */

        if (s->state == sw_string && !s->is_key && !s->capturing) {

            for (q = p; q < last && *q != '"' && *q != '\\'; q++) {
                /* void */
            }

            if (s->counting) {
                ngx_http_token_meter_text_count(&s->text, p, q - p);
            }

            p = q;

            if (p == last) {
                break;
            }
        }

        ngx_http_token_meter_json_char(s, *p++);
    }
}


static void
ngx_http_token_meter_json_char(ngx_http_token_meter_json_scan_t *s, u_char ch)
{
    ngx_uint_t  i, in_array, capture;

    if (s->capturing) {
        if (s->usage_len < NGX_HTTP_TOKEN_METER_USAGE_MAX) {
            s->usage[s->usage_len++] = ch;

        } else {
            s->capturing = 0;
            s->overflow = 1;
        }
    }

    switch (s->state) {

    case sw_value:

        in_array = (s->depth > 0 && s->depth <= 64)
                   ? (s->arrays >> (s->depth - 1)) & 1 : 0;

        switch (ch) {

        case '{':
        case '[':

            capture = 0;

            if (ch == '{' && !s->is_key && !s->capturing && !s->captured
                && ngx_http_token_meter_key_is(s, s->key, s->key_len,
                                               "usage"))
            {
                if (s->depth == 1
                    || (s->depth == 2
                        && ngx_http_token_meter_key_is(s, s->top_key,
                                                       s->top_key_len,
                                                       "response")))
                {
                    capture = 1;
                }
            }

            if (capture) {
                s->capturing = 1;
                s->capture_depth = s->depth;
                s->usage_len = 0;
                s->usage[s->usage_len++] = ch;
            }

            if (ch == '[' && s->depth == 1
                && ngx_http_token_meter_key_is(s, s->key, s->key_len,
                                               "choices"))
            {
                s->in_choices = 1;
            }

            if (ch == '{' && s->in_choices && s->depth == 2) {
                s->choice = 1;
            }

            s->depth++;

            if (s->depth <= 64) {
                if (ch == '[') {
                    s->arrays |= (uint64_t) 1 << (s->depth - 1);

                } else {
                    s->arrays &= ~((uint64_t) 1 << (s->depth - 1));
                }
            }

            s->is_key = (ch == '{');
            s->key_len = 0;
            break;

        case '}':
        case ']':

            if (s->depth == 0) {
                break;
            }

            s->depth--;

            if (s->capturing && s->depth == s->capture_depth) {
                s->capturing = 0;
                s->captured = 1;
            }

            if (s->depth == 1) {
                s->in_choices = 0;
            }

            s->is_key = 0;
            break;

        case ':':
            s->is_key = 0;
            break;

        case ',':
            s->is_key = !in_array && s->depth > 0;
            break;

        case '"':
            s->state = sw_string;

            if (s->is_key) {
                s->key_len = 0;
                s->counting = 0;
                break;
            }

            s->counting = 0;

            for (i = 0; ngx_http_token_meter_text_fields[i]; i++) {
                if (!in_array
                    && ngx_http_token_meter_key_is(s, s->key, s->key_len,
                                           ngx_http_token_meter_text_fields[i]))
                {
                    s->counting = 1;
                    break;
                }
            }

            break;

        default:
            break;
        }

        break;

    case sw_string:

        if (ch == '"') {
            s->state = sw_value;

            if (s->is_key && s->depth == 1) {
                ngx_memcpy(s->top_key, s->key,
                           ngx_min(s->key_len, NGX_HTTP_TOKEN_METER_KEY_MAX));
                s->top_key_len = s->key_len;
            }

            break;
        }

        if (ch == '\\') {
            s->state = sw_escape;
            break;
        }

        if (s->is_key) {
            if (s->key_len < NGX_HTTP_TOKEN_METER_KEY_MAX) {
                s->key[s->key_len] = ch;
            }

            s->key_len++;
            break;
        }

        if (s->counting) {
            if (ch < 0x80) {
                s->text.ascii++;

            } else if (ch >= 0xc0) {
                s->text.other++;
            }
        }

        break;

    case sw_escape:

        if (ch == 'u') {
            s->state = sw_unicode;
            s->hex = 0;
            s->unicode_other = 0;
            break;
        }

        s->state = sw_string;

        if (s->is_key) {
            if (s->key_len < NGX_HTTP_TOKEN_METER_KEY_MAX) {
                s->key[s->key_len] = ch;
            }

            s->key_len++;

        } else if (s->counting) {
            s->text.ascii++;
        }

        break;

    default: /* sw_unicode */

        /* four hex digits: "\u00" followed by 0-7 is an ASCII character */

        if (s->hex == 0 || s->hex == 1) {
            s->unicode_other |= (ch != '0');

        } else if (s->hex == 2) {
            s->unicode_other |= (ch >= '8');
        }

        if (++s->hex < 4) {
            break;
        }

        s->state = sw_string;

        if (s->is_key) {
            s->key_len = NGX_HTTP_TOKEN_METER_KEY_MAX + 1;

        } else if (s->counting) {
            if (s->unicode_other) {
                s->text.other++;

            } else {
                s->text.ascii++;
            }
        }
    }
}


static ngx_uint_t
ngx_http_token_meter_key_is(ngx_http_token_meter_json_scan_t *s, u_char *key,
    size_t len, char *name)
{
    size_t  n;

    n = ngx_strlen(name);

    return len == n && ngx_strncmp(key, name, n) == 0;
}


void
ngx_http_token_meter_sse_scan_init(ngx_http_token_meter_sse_scan_t *s)
{
    ngx_memzero(s, offsetof(ngx_http_token_meter_sse_scan_t, json));
    ngx_http_token_meter_json_scan_init(&s->json);
}


/*
 * Scans until the end of the buffer or the end of an event, whichever
 * comes first.  Returns the position after the last byte consumed; the
 * handler is called when an event ends, with the JSON scanner that read
 * its data, and the scan stops right after that event.
 */

u_char *
ngx_http_token_meter_sse_scan(ngx_http_token_meter_sse_scan_t *s, u_char *p,
    u_char *last, ngx_http_token_meter_event_pt handler, void *data)
{
    u_char  ch, *q;

    for ( /* void */ ; p < last; p++) {
        ch = *p;

        /* "\r\n" is one line end even when split between buffers */

        if (s->cr) {
            s->cr = 0;

            if (ch == '\n') {
                continue;
            }
        }

        if (ch == '\r' || ch == '\n') {

            s->cr = (ch == '\r');

            if (s->state == sw_line_start) {

                /*
                 * an empty line ends the event; a block of comments alone
                 * is reported too, so that it is passed on at once
                 */

                handler(data, &s->json);

                ngx_http_token_meter_json_scan_init(&s->json);
                s->data_lines = 0;
                s->repeat = 0;

                return p + 1;
            }

            if (s->state == sw_field) {

                /* a field name alone, as "data", is a field with no value */

                (void) ngx_http_token_meter_sse_data(s);
            }

            if (s->event_name) {
                ngx_http_token_meter_sse_event_name(s);
            }

            s->state = sw_line_start;
            continue;
        }

        switch (s->state) {

        case sw_line_start:

            if (ch == ':') {
                s->state = sw_skip;
                break;
            }

            s->field_len = 0;
            s->state = sw_field;

            /* fall through */

        case sw_field:

            if (ch == ':') {

                if (ngx_http_token_meter_sse_data(s)) {
                    s->state = sw_value_start;

                } else if (s->field_len == 5
                           && ngx_strncmp(s->field, "event", 5) == 0)
                {
                    /* only the last 8 bytes of the name are kept */

                    s->event_name = 1;
                    s->name_dot = 0;
                    s->name_len = 0;
                    s->state = sw_skip;

                } else {
                    s->state = sw_skip;
                }

                break;
            }

            if (s->field_len < sizeof(s->field)) {
                s->field[s->field_len] = ch;
            }

            s->field_len++;
            break;

        case sw_value_start:

            s->state = sw_data;

            if (ch == ' ') {
                break;
            }

            /* fall through */

        case sw_data:

            /* the rest of the line at once: the loop goes on at its end */

            for (q = p + 1; q < last && *q != '\r' && *q != '\n'; q++) {
                /* void */
            }

            ngx_http_token_meter_json_scan(&s->json, p, q);

            p = q - 1;
            break;

        default: /* sw_skip */

            if (s->event_name && !(s->name_len == 0 && ch == ' ')) {
                s->name[s->name_len++ % sizeof(s->name)] = ch;
                s->name_dot |= (ch == '.');
            }

            break;
        }
    }

    return p;
}


/*
 * An event named like "response.output_text.done" repeats text sent
 * before; one named "message", or a ".delta", or none at all, does not.
 */

static void
ngx_http_token_meter_sse_event_name(ngx_http_token_meter_sse_scan_t *s)
{
    ngx_uint_t  i, n, delta;
    u_char      tail[sizeof(s->name)];

    s->event_name = 0;

    n = ngx_min(s->name_len, sizeof(s->name));

    for (i = 0; i < n; i++) {
        tail[i] = s->name[(s->name_len - n + i) % sizeof(s->name)];
    }

    delta = (n >= 6 && ngx_strncmp(tail + n - 6, ".delta", 6) == 0);

    s->repeat = s->name_dot && !delta;
}


/* a "data" field starts: its lines within one event are joined with "\n" */

static ngx_uint_t
ngx_http_token_meter_sse_data(ngx_http_token_meter_sse_scan_t *s)
{
    if (s->field_len != 4 || ngx_strncmp(s->field, "data", 4) != 0) {
        return 0;
    }

    if (s->data_lines) {
        ngx_http_token_meter_json_scan(&s->json, (u_char *) "\n",
                                       (u_char *) "\n" + 1);
    }

    s->data_lines = 1;

    return 1;
}


/*
 * Reads the usage object of chat completions, completions and embeddings
 * ("prompt_tokens", "completion_tokens") or of the Responses API
 * ("input_tokens", "output_tokens"), with the cached input tokens from
 * "prompt_tokens_details" or "input_tokens_details".  The object is small
 * and was cut out of the answer by the JSON scanner; it is read here with
 * no allocation.  A count that is negative, not an integer, not a number,
 * or above 10^9 makes the whole usage invalid.
 */

ngx_int_t
ngx_http_token_meter_usage_parse(u_char *text, size_t len,
    ngx_http_token_meter_usage_t *usage)
{
    u_char      *p, *last, *start;
    size_t       key_len;
    int64_t      n, hits, *target;
    ngx_uint_t   depth, found, cached, in_details, expect_key, need_value;
    ngx_uint_t   string;
    u_char       key[NGX_HTTP_TOKEN_METER_KEY_MAX];

    ngx_memzero(usage, sizeof(ngx_http_token_meter_usage_t));

    p = text;
    last = text + len;

    depth = 0;
    found = 0;
    cached = 0;
    hits = -1;
    in_details = 0;
    expect_key = 0;
    need_value = 0;
    key_len = 0;

    while (p < last) {

        /* an object or an array where a count belongs is not a count */

        if ((*p == '{' || *p == '[') && need_value
            && ngx_http_token_meter_usage_count(usage, key, key_len, depth,
                                                in_details, &hits)
               != NULL)
        {
            return NGX_ERROR;
        }

        switch (*p) {

        case ' ': case '\t': case '\r': case '\n': case ':':
            p++;
            continue;

        case '{':
            depth++;
            need_value = 0;

            /* the only nested object read is the one with cached tokens */

            in_details = (depth == 2
                          && ((key_len == sizeof("prompt_tokens_details") - 1
                               && ngx_strncmp(key, "prompt_tokens_details",
                                              key_len) == 0)
                              || (key_len == sizeof("input_tokens_details") - 1
                                  && ngx_strncmp(key, "input_tokens_details",
                                                 key_len) == 0)));

            expect_key = (depth == 1 || in_details);
            p++;
            continue;

        case '}':
        case ']':
            if (depth == 0 || need_value) {
                return NGX_ERROR;
            }

            depth--;
            in_details = 0;
            expect_key = 0;
            p++;
            continue;

        case '[':
            depth++;
            need_value = 0;
            in_details = 0;
            expect_key = 0;
            p++;
            continue;

        case ',':
            if (need_value) {
                return NGX_ERROR;
            }

            expect_key = (depth == 1 || in_details);
            p++;
            continue;

        default:
            break;
        }

        /* a key, or a value: a string, a number or a literal */

        string = (*p == '"');
        start = p;

        if (string) {
            for (p++; p < last && *p != '"'; p++) {
                if (*p == '\\') {
                    p++;
                }
            }

            if (p >= last) {
                return NGX_ERROR;
            }

            p++;

        } else {
            while (p < last && *p != ',' && *p != '}' && *p != ']'
                   && *p != ' ' && *p != '\t' && *p != '\r' && *p != '\n'
                   && *p != ':')
            {
                p++;
            }
        }

        if (expect_key) {
            expect_key = 0;
            need_value = 1;
            key_len = 0;

            if (string && (size_t) (p - start - 2)
                          <= NGX_HTTP_TOKEN_METER_KEY_MAX)
            {
                key_len = p - start - 2;
                ngx_memcpy(key, start + 1, key_len);
            }

            continue;
        }

        need_value = 0;

        target = ngx_http_token_meter_usage_count(usage, key, key_len, depth,
                                                  in_details, &hits);

        if (target == NULL) {
            continue;
        }

        if (p - start == 4 && ngx_strncmp(start, "null", 4) == 0) {
            continue;
        }

        /* a whole number of at most ten digits: no sign, no fraction */

        if (string || p - start > 10) {
            return NGX_ERROR;
        }

        n = 0;

        for ( /* void */ ; start < p; start++) {
            if (*start < '0' || *start > '9') {
                return NGX_ERROR;
            }

            n = n * 10 + (*start - '0');
        }

        if (n > NGX_HTTP_TOKEN_METER_MAX_TOKENS) {
            return NGX_ERROR;
        }

        *target = n;

        if (target == &usage->cached) {
            cached = 1;

        } else if (target != &hits) {
            found = 1;
        }
    }

    if (!found || depth != 0 || need_value) {
        return NGX_ERROR;
    }

    if (!cached && hits >= 0) {
        usage->cached = hits;
    }

    if (usage->cached > usage->input) {
        usage->cached = usage->input;
    }

    return NGX_OK;
}


/* where the count named by a key goes, or NULL for a key that is no count */

static int64_t *
ngx_http_token_meter_usage_count(ngx_http_token_meter_usage_t *usage,
    u_char *key, size_t len, ngx_uint_t depth, ngx_uint_t in_details,
    int64_t *hits)
{
    ngx_uint_t  i;

    static struct {
        char    *name;
        size_t   offset;
    }  fields[] = {
        { "prompt_tokens", offsetof(ngx_http_token_meter_usage_t, input) },
        { "input_tokens", offsetof(ngx_http_token_meter_usage_t, input) },
        { "completion_tokens",
          offsetof(ngx_http_token_meter_usage_t, output) },
        { "output_tokens", offsetof(ngx_http_token_meter_usage_t, output) },
        { NULL, 0 }
    };

    if (depth == 1) {
        for (i = 0; fields[i].name; i++) {
            if (len == ngx_strlen(fields[i].name)
                && ngx_strncmp(key, fields[i].name, len) == 0)
            {
                return (int64_t *) ((u_char *) usage + fields[i].offset);
            }
        }

        /* DeepSeek names its cached input "prompt_cache_hit_tokens" */

        if (len == sizeof("prompt_cache_hit_tokens") - 1
            && ngx_strncmp(key, "prompt_cache_hit_tokens", len) == 0)
        {
            return hits;
        }

        return NULL;
    }

    if (in_details && depth == 2
        && len == sizeof("cached_tokens") - 1
        && ngx_strncmp(key, "cached_tokens", len) == 0)
    {
        return &usage->cached;
    }

    return NULL;
}


int64_t
ngx_http_token_meter_text_tokens(ngx_http_token_meter_text_t *text)
{
    return (text->ascii + 3) / 4 + text->other;
}


void
ngx_http_token_meter_text_count(ngx_http_token_meter_text_t *text, u_char *p,
    size_t len)
{
    u_char  *last;

    for (last = p + len; p < last; p++) {
        if (*p < 0x80) {
            text->ascii++;

        } else if (*p >= 0xc0) {
            text->other++;
        }
    }
}


/*
 * The input estimate of a request body: 3 tokens, 4 more for each message,
 * and the text of the fields that reach the model, at one token for four
 * ASCII characters and one for any other character.
 */

int64_t
ngx_http_token_meter_input_tokens(json_t *body)
{
    json_t                       *value;
    int64_t                       tokens;
    ngx_uint_t                    i;
    ngx_http_token_meter_text_t   text;

    ngx_memzero(&text, sizeof(ngx_http_token_meter_text_t));

    tokens = 3;

    for (i = 0; ngx_http_token_meter_input_fields[i]; i++) {
        value = json_object_get(body, ngx_http_token_meter_input_fields[i]);

        if (value == NULL) {
            continue;
        }

        if (i == 0 && json_is_array(value)) {
            tokens += 4 * (int64_t) json_array_size(value);
        }

        ngx_http_token_meter_estimate(value, &text, 0);
    }

    return tokens + ngx_http_token_meter_text_tokens(&text);
}


static void
ngx_http_token_meter_estimate(json_t *value,
    ngx_http_token_meter_text_t *text, ngx_uint_t depth)
{
    size_t       i;
    json_t      *v;
    const char  *k;

    /* jansson limits nesting when parsing; this keeps the walk bounded too */

    if (depth > NGX_HTTP_TOKEN_METER_DEPTH_MAX) {
        return;
    }

    switch (json_typeof(value)) {

    case JSON_STRING:
        ngx_http_token_meter_text_count(text,
                                        (u_char *) json_string_value(value),
                                        json_string_length(value));
        break;

    case JSON_ARRAY:
        json_array_foreach(value, i, v) {
            ngx_http_token_meter_estimate(v, text, depth + 1);
        }
        break;

    case JSON_OBJECT:
        json_object_foreach(value, k, v) {
            ngx_http_token_meter_estimate(v, text, depth + 1);
        }
        break;

    default:
        break;
    }
}
