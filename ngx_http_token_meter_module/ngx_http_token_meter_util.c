
/*
 * Copyright (C) The ngx_http_token_meter_module authors
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>
#include <openssl/evp.h>
#include <openssl/rand.h>

#include "ngx_http_token_meter_module.h"


/* the SHA-256 of this process, fetched once; see below */

static const EVP_MD  *ngx_http_token_meter_md;


void
ngx_http_token_meter_sha256(u_char *data, size_t len, u_char *digest)
{
    unsigned int  n;

    /*
     * OpenSSL 3 looks the algorithm up on every EVP_sha256() digest, which
     * costs more than hashing a key; fetch it once per process instead
     */

    if (ngx_http_token_meter_md == NULL) {
#if (OPENSSL_VERSION_NUMBER >= 0x30000000L)
        ngx_http_token_meter_md = EVP_MD_fetch(NULL, "SHA256", NULL);
#endif
        if (ngx_http_token_meter_md == NULL) {
            ngx_http_token_meter_md = EVP_sha256();
        }
    }

    (void) EVP_Digest(data, len, digest, &n, ngx_http_token_meter_md, NULL);
}


/*
 * Called when the process exits: a fetched method is counted and must be
 * given back, or it is lost when nginx unloads the module; EVP_MD_free()
 * ignores the static one EVP_sha256() returns.
 */

void
ngx_http_token_meter_sha256_free(void)
{
#if (OPENSSL_VERSION_NUMBER >= 0x30000000L)
    EVP_MD_free((EVP_MD *) ngx_http_token_meter_md);
#endif
    ngx_http_token_meter_md = NULL;
}


ngx_int_t
ngx_http_token_meter_random(u_char *buf, size_t len)
{
    if (RAND_bytes(buf, (int) len) != 1) {
        return NGX_ERROR;
    }

    return NGX_OK;
}


/* RFC 3339 in UTC: "2026-12-03T18:40:57Z", 20 bytes */

u_char *
ngx_http_token_meter_time(u_char *p, time_t t)
{
    ngx_tm_t  tm;

    ngx_gmtime(t, &tm);

    return ngx_sprintf(p, "%4d-%02d-%02dT%02d:%02d:%02dZ",
                       tm.ngx_tm_year, tm.ngx_tm_mon, tm.ngx_tm_mday,
                       tm.ngx_tm_hour, tm.ngx_tm_min, tm.ngx_tm_sec);
}


/*
 * Parses a non-negative decimal such as "4", "0.25" or "1.125" into an
 * integer number of 1/scale units; scale is 1 or a power of ten, and more
 * decimals than the scale holds are refused rather than rounded.
 */

ngx_int_t
ngx_http_token_meter_parse_points(ngx_str_t *s, ngx_uint_t scale,
    int64_t *value)
{
    u_char      *p, *last;
    int64_t      n, frac;
    ngx_uint_t   digits, unit;

    p = s->data;
    last = p + s->len;

    if (p == last || *p < '0' || *p > '9') {
        return NGX_ERROR;
    }

    n = 0;

    for ( /* void */ ; p < last && *p >= '0' && *p <= '9'; p++) {
        n = n * 10 + (*p - '0');

        if (n > NGX_HTTP_TOKEN_METER_MAX_POINTS) {
            return NGX_ERROR;
        }
    }

    frac = 0;
    unit = scale;

    if (p < last && *p == '.') {
        p++;
        digits = 0;

        for ( /* void */ ; p < last && *p >= '0' && *p <= '9'; p++) {
            unit /= 10;

            if (unit == 0) {
                return NGX_ERROR;
            }

            frac += (*p - '0') * unit;
            digits++;
        }

        if (digits == 0) {
            return NGX_ERROR;
        }
    }

    if (p != last) {
        return NGX_ERROR;
    }

    *value = n * (int64_t) scale + frac;

    return NGX_OK;
}


/* the credentials of "Authorization: Bearer <token>" */

ngx_int_t
ngx_http_token_meter_bearer(ngx_table_elt_t *h, ngx_str_t *token)
{
    u_char  *p, *last;

    if (h == NULL || h->value.len <= 7
        || ngx_strncasecmp(h->value.data, (u_char *) "Bearer ", 7) != 0)
    {
        return NGX_DECLINED;
    }

    p = h->value.data + 7;
    last = h->value.data + h->value.len;

    while (p < last && *p == ' ') {
        p++;
    }

    if (p == last) {
        return NGX_DECLINED;
    }

    token->data = p;
    token->len = last - p;

    return NGX_OK;
}
