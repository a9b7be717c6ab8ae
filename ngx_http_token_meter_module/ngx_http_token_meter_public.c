
/*
 * Copyright (C) The ngx_http_token_meter_module authors
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>
#include <jansson.h>

#include "ngx_http_token_meter_module.h"
#include "ngx_http_token_meter_account.h"
#include "ngx_http_token_meter_json.h"


static json_t *ngx_http_token_meter_price_json(int64_t price);


/*
 * token_meter_balance: a subscriber asks, with their own API key, how
 * many points they have.
 */

ngx_int_t
ngx_http_token_meter_balance_handler(ngx_http_request_t *r)
{
    u_char                             *p;
    json_t                             *json, *value;
    time_t                              now;
    ngx_int_t                           rc;
    ngx_str_t                           key, msisdn;
    ngx_uint_t                          i;
    ngx_http_token_meter_txn_t         *txn;
    ngx_http_token_meter_balance_t      balance;
    ngx_http_token_meter_main_conf_t   *tmcf;
    ngx_http_token_meter_subscriber_t   sub;
    uint64_t                            id;
    u_char                              buf[sizeof("sub_") + NGX_INT64_LEN];

    static char  *status[] = { "", "active", "suspended", "closed" };

    rc = ngx_http_discard_request_body(r);
    if (rc != NGX_OK) {
        return rc;
    }

    if (r->method != NGX_HTTP_GET && r->method != NGX_HTTP_HEAD) {
        if (ngx_http_token_meter_allow(r, "GET, HEAD") != NGX_OK) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        return ngx_http_token_meter_send_error(r, NGX_HTTP_NOT_ALLOWED,
                                               "invalid_request_error",
                                               "method_not_allowed",
                                               "Use GET for the balance.");
    }

    if (ngx_http_token_meter_api_key(r, &key) != NGX_OK) {
        return ngx_http_token_meter_send_error(r, NGX_HTTP_UNAUTHORIZED,
                   "invalid_request_error", "invalid_api_key",
                   "You didn't provide an API key.");
    }

    tmcf = ngx_http_get_module_main_conf(r, ngx_http_token_meter_module);

    now = ngx_time();

    ngx_http_token_meter_flush();

    rc = ngx_http_token_meter_txn_begin(tmcf->store, &txn, 0,
                                        r->connection->log);
    if (rc != NGX_OK) {
        return ngx_http_token_meter_store_error(r, rc);
    }

    rc = ngx_http_token_meter_key_find(txn, &key, &id);

    if (rc == NGX_OK) {
        rc = ngx_http_token_meter_subscriber_get(txn, id, &sub);
    }

    if (rc == NGX_OK) {
        rc = ngx_http_token_meter_balance(txn, &sub, now, &balance);
    }

    ngx_http_token_meter_txn_abort(txn);

    if (rc == NGX_DECLINED) {
        return ngx_http_token_meter_send_error(r, NGX_HTTP_UNAUTHORIZED,
                                               "invalid_request_error",
                                               "invalid_api_key",
                                               "Incorrect API key provided.");
    }

    if (rc != NGX_OK) {
        return ngx_http_token_meter_store_error(r, rc);
    }

    json = ngx_http_token_meter_balance_json(&balance);
    if (json == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    p = ngx_sprintf(buf, "sub_%uL", sub.id);
    msisdn = ngx_http_token_meter_msisdn(&sub);

    ngx_http_token_meter_json_set(json, "object", json_string("balance"));
    ngx_http_token_meter_json_set(json, "subscriber",
                                  json_stringn((char *) buf, p - buf));
    ngx_http_token_meter_json_set(json, "msisdn",
                                  ngx_http_token_meter_json_string(&msisdn));
    ngx_http_token_meter_json_set(json, "status",
                                  json_string(status[sub.status & 3]));

    value = json_null();

    for (i = 0; i < balance.ngrants; i++) {
        if (balance.grant[i].kind == NGX_HTTP_TOKEN_METER_GRANT_TRIAL) {
            json_decref(value);
            value = ngx_http_token_meter_json_time(balance.grant[i].expires);
            break;
        }
    }

    if (ngx_http_token_meter_json_set(json, "trial_expires_at", value)
        != NGX_OK)
    {
        json_decref(json);
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    rc = ngx_http_token_meter_send_json(r, NGX_HTTP_OK, json);

    json_decref(json);

    return rc;
}


/* token_meter_models: the OpenAI model list, with prices in points */

ngx_int_t
ngx_http_token_meter_models_handler(ngx_http_request_t *r)
{
    json_t                            *json, *data, *model;
    ngx_int_t                          rc;
    ngx_uint_t                         i;
    ngx_http_token_meter_model_t      *m;
    ngx_http_token_meter_main_conf_t  *tmcf;

    rc = ngx_http_discard_request_body(r);
    if (rc != NGX_OK) {
        return rc;
    }

    if (r->method != NGX_HTTP_GET && r->method != NGX_HTTP_HEAD) {
        if (ngx_http_token_meter_allow(r, "GET, HEAD") != NGX_OK) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        return ngx_http_token_meter_send_error(r, NGX_HTTP_NOT_ALLOWED,
                                               "invalid_request_error",
                                               "method_not_allowed",
                                               "Use GET for the model list.");
    }

    tmcf = ngx_http_get_module_main_conf(r, ngx_http_token_meter_module);

    json = json_object();
    data = json_array();

    m = tmcf->models.elts;

    for (i = 0; data && i < tmcf->models.nelts; i++) {
        model = json_object();

        ngx_http_token_meter_json_set(model, "id",
                                      ngx_http_token_meter_json_string(
                                          &m[i].name));
        ngx_http_token_meter_json_set(model, "object", json_string("model"));
        ngx_http_token_meter_json_set(model, "created", json_integer(0));
        ngx_http_token_meter_json_set(model, "owned_by",
                                      ngx_http_token_meter_json_string(
                                          &m[i].upstream));
        ngx_http_token_meter_json_set(model, "max_output_tokens",
                                      json_integer(m[i].max_output));
        ngx_http_token_meter_json_set(model, "pricing",
            json_pack("{s:o,s:o,s:o,s:s}",
                      "input", ngx_http_token_meter_price_json(m[i].input),
                      "cached_input",
                      ngx_http_token_meter_price_json(m[i].cached),
                      "output", ngx_http_token_meter_price_json(m[i].output),
                      "unit", "points per token"));

        if (model == NULL || json_array_append_new(data, model) != 0) {
            json_decref(data);
            data = NULL;
        }
    }

    ngx_http_token_meter_json_set(json, "object", json_string("list"));

    if (ngx_http_token_meter_json_set(json, "data", data) != NGX_OK) {
        if (json) {
            json_decref(json);
        }

        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    rc = ngx_http_token_meter_send_json(r, NGX_HTTP_OK, json);

    json_decref(json);

    return rc;
}


/* prices are strings such as "0.25", so that no float is involved */

static json_t *
ngx_http_token_meter_price_json(int64_t price)
{
    u_char   *p;
    int64_t   frac;
    u_char    buf[NGX_INT64_LEN + 5];

    p = ngx_sprintf(buf, "%L", price / NGX_HTTP_TOKEN_METER_PRICE_SCALE);

    frac = price % NGX_HTTP_TOKEN_METER_PRICE_SCALE;

    if (frac) {
        p = ngx_sprintf(p, ".%03L", frac);

        while (p[-1] == '0') {
            p--;
        }
    }

    return json_stringn((char *) buf, p - buf);
}


/*
 * token_meter_error: an error page in the OpenAI shape, for the errors
 * nginx itself answers (a body too large, an upstream that is down), so
 * that SDKs see the same kind of error as from the module.  Used as
 * "error_page 413 502 504 @token_meter_error;".
 */

ngx_int_t
ngx_http_token_meter_error_handler(ngx_http_request_t *r)
{
    ngx_uint_t  status, i;

    static struct {
        ngx_uint_t   status;
        char        *code;
        char        *message;
    }  errors[] = {
        { 400, "invalid_request_error", "The request could not be read: "
                                         "it is malformed, or its headers are "
                                         "too large." },
        { 404, "not_found", "Nothing is served at this path." },
        { 405, "method_not_allowed", "This method is not allowed here." },
        { 408, "timeout", "The request took too long to arrive." },
        { 413, "request_too_large", "The request body is too large." },
        { 414, "request_too_large", "The request line is too long." },
        { 429, "rate_limit_exceeded", "Too many requests." },
        { 494, "request_too_large", "The request headers are too large." },
        { 502, "upstream_error", "The model's server could not be reached." },
        { 503, "service_unavailable", "The service is unavailable." },
        { 504, "upstream_timeout", "The model's server did not answer in "
                                   "time." },
        { 0, "server_error", "The server failed to answer." }
    };

    status = r->err_status ? r->err_status : NGX_HTTP_INTERNAL_SERVER_ERROR;

    for (i = 0; errors[i].status; i++) {
        if (errors[i].status == status) {
            break;
        }
    }

    if (status == 494) {
        status = NGX_HTTP_BAD_REQUEST;
    }

    return ngx_http_token_meter_send_error(r, status,
                                           status >= 500
                                           ? "server_error"
                                           : "invalid_request_error",
                                           errors[i].code, "%s",
                                           errors[i].message);
}
